//! Fuzzes the standalone shard reader: any bytes must give `Ok` or an error, never a panic or an abort.
//!
//! Run with `cargo +nightly fuzz run read_shard` from `pack/`; seed the corpus with real shards, e.g.
//! `cp DATASET/shard-0000*.arrow pack/fuzz/corpus/read_shard/`. The normal test suite runs a bounded version
//! (`mutated_shard_bytes_are_errors_never_panics` in pack/tests/reader.rs) over generated shards.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = imglish_pack::read_shard_bytes(data);
});
