# Sourced by the scripts: the shared build cache. A persistent target directory outside the clone lets fresh
# clones on the same machine reuse compiled dependencies; override with CARGO_TARGET_DIR or IMGLISH_CACHE.
export IMGLISH_CACHE="${IMGLISH_CACHE:-$HOME/.cache/imglish}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$IMGLISH_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
