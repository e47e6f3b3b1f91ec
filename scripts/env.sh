# Sourced by the scripts: the shared build cache. A persistent target directory outside the clone lets fresh
# clones on the same machine reuse compiled dependencies; override with CARGO_TARGET_DIR or IMGLISH_CACHE.
export IMGLISH_CACHE="${IMGLISH_CACHE:-$HOME/.cache/imglish}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$IMGLISH_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The interpreter pyo3's build script asks about (the native module is abi3: any CPython >= 3.9 will do).
if [ -z "${PYO3_PYTHON:-}" ] && command -v python3 >/dev/null; then
  export PYO3_PYTHON="$(command -v python3)"
fi
