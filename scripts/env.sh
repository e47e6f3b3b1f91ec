# Sourced by the scripts: the shared build cache. A persistent target directory outside the clone lets fresh
# clones on the same machine reuse compiled dependencies; override with CARGO_TARGET_DIR or IMGLISH_CACHE.
export IMGLISH_CACHE="${IMGLISH_CACHE:-$HOME/.cache/imglish}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$IMGLISH_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The interpreter pyo3's build script asks about (the native module is abi3: any CPython >= 3.9 will do).
if [ -z "${PYO3_PYTHON:-}" ] && command -v python3 >/dev/null; then
  export PYO3_PYTHON="$(command -v python3)"
fi
# Every script builds with one feature set, cargo test's (the whole workspace with its dev-dependencies, which an
# example brings in): `cargo build --bin imglish` or `-p PACKAGE` alone unify features differently and compile
# polars, arrow and tokio once more each (minutes on 2 cores when cold). Extra arguments add targets
# (`--example bench`); `-q` and `--locked` are implied.
imglish_build() { cargo build -q --locked --workspace --bin imglish --example serve "$@"; }
