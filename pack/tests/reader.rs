//! The reader: exactly-once partitioning, resume (elastic), views, shuffle quality, corruption handling.

mod common;

use std::path::{Path, PathBuf};

use common::{info, record, write_parts};
use imglish_pack::*;

/// A dataset of `n` samples (ids 0..n, one in ten val) in `dir`, batches of 16, several shards.
fn dataset(dir: &Path, n: u64, pixels: bool) -> PathBuf {
    let info = info(3, [2, 4], 256);
    write_parts(&dir.join("tokens"), &info, &(0..n).collect::<Vec<_>>(), 97, pixels);
    let cfg = PackConfig {
        target_shard_bytes: 4_000,
        batch_rows: 16,
        zstd_level: 1,
        shuffle_seed: None,
        include_pixels: pixels,
    };
    let out = dir.join("ds");
    pack_dataset(&dir.join("tokens"), None, &out, &cfg, &|_| {}).expect("pack");
    out
}

fn opts(shuffle: Shuffle, rank: u32, world_size: u32, workers: u32) -> StreamOptions {
    StreamOptions {
        shuffle,
        seed: 42,
        partition: Partition {
            rank,
            world_size,
            worker: 0,
            num_workers: workers,
        },
        chunk_samples: 50,
        ..StreamOptions::default()
    }
}

fn collect(ds: &Dataset, o: &StreamOptions, state: StreamState) -> Vec<Sample> {
    ds.stream(o, state)
        .expect("stream")
        .collect::<Result<Vec<_>>>()
        .expect("samples")
}

const SHUFFLES: [Shuffle; 3] = [Shuffle::None, Shuffle::Global, Shuffle::Window { batches: 3 }];

#[test]
fn every_sample_exactly_once_across_ranks_and_workers() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 1000, false)).expect("open");
    let n_train = ds.index().counts.train;
    assert_eq!(n_train, 900);
    for shuffle in SHUFFLES {
        for (world, workers) in [(1, 1), (2, 3), (3, 1), (4, 2), (7, 1), (7, 4)] {
            let mut ids = Vec::new();
            let mut counts = Vec::new();
            for rank in 0..world {
                let samples = collect(&ds, &opts(shuffle, rank, world, workers), StreamState::default());
                // The rank's order is its positions, rank + k * world_size.
                for (k, s) in samples.iter().enumerate() {
                    assert_eq!(s.position, u64::from(rank) + k as u64 * u64::from(world));
                    assert_eq!(s.split, Split::Train);
                }
                counts.push(samples.len());
                ids.extend(samples.iter().map(|s| s.sample_id));
            }
            ids.sort_unstable();
            let expect: Vec<u64> = (0..1000).filter(|i| i % 10 != 9).collect();
            assert_eq!(ids, expect, "{shuffle:?} world {world} workers {workers}");
            let (lo, hi) = (counts.iter().min().copied(), counts.iter().max().copied());
            assert!(
                hi.unwrap_or(0) - lo.unwrap_or(0) <= 1,
                "ranks differ by at most one: {counts:?}"
            );
        }
    }
}

#[test]
fn partition_positions_cover_the_epoch_exactly_once() {
    for n in [0u64, 1, 5, 64, 1001] {
        for world in 1..6u32 {
            for workers in 1..4u32 {
                for start in [0, n / 3] {
                    let mut all = Vec::new();
                    for rank in 0..world {
                        for worker in 0..workers {
                            let p = Partition {
                                rank,
                                world_size: world,
                                worker,
                                num_workers: workers,
                            };
                            all.extend(p.positions(start, n));
                        }
                    }
                    all.sort_unstable();
                    assert_eq!(
                        all,
                        (start..n).collect::<Vec<_>>(),
                        "n {n} world {world} workers {workers}"
                    );
                }
            }
        }
    }
}

#[test]
fn drop_last_gives_every_rank_the_same_count() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 1000, false)).expect("open");
    let mut lens = Vec::new();
    for rank in 0..7 {
        let mut o = opts(Shuffle::Global, rank, 7, 1);
        o.drop_last = true;
        lens.push(collect(&ds, &o, StreamState::default()).len());
    }
    assert_eq!(lens, vec![900 / 7; 7]);
}

#[test]
fn orders_are_deterministic_per_seed_and_epoch() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 600, false)).expect("open");
    for shuffle in [Shuffle::Global, Shuffle::Window { batches: 4 }] {
        let o = opts(shuffle, 0, 1, 2);
        let ids = |epoch| {
            collect(&ds, &o, StreamState { epoch, position: 0 })
                .iter()
                .map(|s| s.sample_id)
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (ids(0), ids(0), ids(1));
        assert_eq!(a, b);
        assert_ne!(a, c, "a new epoch reshuffles");
        let mut o2 = o.clone();
        o2.seed = 43;
        let d: Vec<u64> = collect(&ds, &o2, StreamState::default())
            .iter()
            .map(|s| s.sample_id)
            .collect();
        assert_ne!(a, d, "another seed, another order");
    }
}

#[test]
fn views_are_chosen_per_epoch_from_the_stored_ones() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 300, true)).expect("open");
    let info = ds.tokenizer().clone();
    let mut per_view = [0usize; 3];
    let mut changed = 0;
    let e0 = collect(
        &ds,
        &opts(Shuffle::None, 0, 1, 1),
        StreamState { epoch: 0, position: 0 },
    );
    let e1 = collect(
        &ds,
        &opts(Shuffle::None, 0, 1, 1),
        StreamState { epoch: 1, position: 0 },
    );
    for (a, b) in e0.iter().zip(&e1) {
        assert_eq!(a.sample_id, b.sample_id);
        let full = record(&info, a.sample_id, true);
        let v = &full.views[a.view as usize];
        assert_eq!(
            (a.tokens.as_slice(), a.crop, a.flip),
            (v.tokens.as_slice(), v.crop, v.flip)
        );
        assert_eq!(
            (&a.captions, a.label, &a.pixels),
            (&full.captions, full.label, &full.pixels)
        );
        assert_eq!(a.view, view_for(42, 0, a.sample_id, 3));
        per_view[a.view as usize] += 1;
        changed += usize::from(a.view != b.view);
    }
    assert!(per_view.iter().all(|&c| c > 60), "all views used: {per_view:?}");
    assert!(changed > 100, "views change between epochs: {changed}");
}

#[test]
fn resume_with_the_same_or_another_world_size_delivers_the_rest_exactly_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 1000, false)).expect("open");
    for shuffle in SHUFFLES {
        for (old, new) in [(2u32, 2u32), (4, 3), (3, 5), (2, 1), (1, 4)] {
            // The old run: every rank takes 37 samples, then checkpoints.
            let mut before = Vec::new();
            let mut states = Vec::new();
            for rank in 0..old {
                let mut s = ds
                    .stream(&opts(shuffle, rank, old, 2), StreamState { epoch: 3, position: 0 })
                    .expect("stream");
                for _ in 0..37 {
                    before.push(s.next().expect("sample").expect("ok").sample_id);
                }
                states.push(s.state());
            }
            assert!(
                states.windows(2).all(|w| w[0] == w[1]),
                "ranks agree on the state: {states:?}"
            );
            assert_eq!(
                states[0],
                StreamState {
                    epoch: 3,
                    position: 37 * u64::from(old)
                }
            );
            let state: StreamState =
                serde_json::from_str(&serde_json::to_string(&states[0]).expect("ser")).expect("de");
            let mut after = Vec::new();
            for rank in 0..new {
                let mut s = ds.stream(&opts(shuffle, rank, new, 1), state).expect("stream");
                after.extend(s.by_ref().map(|x| x.expect("ok").sample_id));
                assert_eq!(
                    s.state(),
                    StreamState { epoch: 4, position: 0 },
                    "exhausted: next epoch"
                );
            }
            let mut all = before.clone();
            all.extend(&after);
            all.sort_unstable();
            let expect: Vec<u64> = (0..1000).filter(|i| i % 10 != 9).collect();
            assert_eq!(all, expect, "{shuffle:?} {old} -> {new}");
            // And the resumed run continues the same epoch order.
            let full = collect(&ds, &opts(shuffle, 0, 1, 1), StreamState { epoch: 3, position: 0 });
            let mut tail: Vec<u64> = full[37 * old as usize..].iter().map(|s| s.sample_id).collect();
            tail.sort_unstable();
            after.sort_unstable();
            assert_eq!(after, tail);
        }
    }
}

#[test]
fn shuffle_quality_global_is_near_ideal_window_is_local() {
    let work = tempfile::tempdir().expect("tempdir");
    let ds = Dataset::open(dataset(work.path(), 1000, false)).expect("open");
    let none = mean_jump_ratio(&ds.epoch_order(Some(Split::Train), Shuffle::None, 1, 0).expect("order"));
    let global = mean_jump_ratio(
        &ds.epoch_order(Some(Split::Train), Shuffle::Global, 1, 0)
            .expect("order"),
    );
    let window = mean_jump_ratio(
        &ds.epoch_order(Some(Split::Train), Shuffle::Window { batches: 4 }, 1, 0)
            .expect("order"),
    );
    assert!(none < 0.01, "{none}");
    assert!((0.9..1.1).contains(&global), "{global}");
    assert!(window > none && window < global, "{window}");
    // A larger domain, no dataset needed: a Feistel permutation is a bijection with ideal jumps.
    let n = 100_003;
    let p = Permutation::new(n, 99);
    let mut seen = vec![false; n as usize];
    let mut jumps = 0f64;
    let mut prev = p.apply(0);
    for i in 0..n {
        let x = p.apply(i);
        assert!(!seen[x as usize]);
        seen[x as usize] = true;
        if i > 0 {
            jumps += x.abs_diff(prev) as f64;
        }
        prev = x;
    }
    let ratio = jumps / (n - 1) as f64 / ((n + 1) as f64 / 3.0);
    assert!((0.97..1.03).contains(&ratio), "{ratio}");
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn corrupt_shards_are_errors_naming_them() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = dataset(work.path(), 600, false);
    let index = DatasetIndex::read(&out).expect("index");
    let (s1, s3) = (&index.shards[1], &index.shards[3]);
    // Truncate one shard, flip a byte in another.
    let p1 = out.join(&s1.file);
    let bytes = std::fs::read(&p1).expect("read");
    std::fs::write(&p1, &bytes[..bytes.len() - 100]).expect("truncate");
    flip_byte(&out.join(&s3.file), 500);

    let ds = Dataset::open(&out).expect("open");
    let e = ds.read_batch(1, 0).expect_err("truncated");
    assert_eq!(
        e.to_string(),
        format!(
            "shard shard-00001.arrow: is {} bytes, the index says {} (truncated or replaced)",
            s1.bytes - 100,
            s1.bytes
        )
    );
    let e = ds.batch_records(3, 0).expect_err("flipped");
    let (actual, _) = {
        use sha2::{Digest, Sha256};
        let b = std::fs::read(out.join(&s3.file)).expect("read");
        (
            Sha256::digest(&b)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            (),
        )
    };
    assert_eq!(
        e.to_string(),
        format!(
            "shard shard-00003.arrow: sha256 is {actual}, the index says {}",
            s3.sha256
        )
    );

    let report = ds.verify();
    let bad: Vec<&str> = report.bad.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(bad, vec!["shard-00001.arrow", "shard-00003.arrow"]);
    assert!(!report.is_ok());

    // A stream fails on the first bad shard, naming it; with skip_corrupt it goes on and counts.
    let o = opts(Shuffle::None, 0, 1, 1);
    let results: Vec<Result<Sample>> = ds.stream(&o, StreamState::default()).expect("stream").collect();
    let err = results.last().expect("some").as_ref().expect_err("ends with the error");
    assert!(err.to_string().starts_with("shard shard-00001.arrow: "), "{err}");
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert_eq!(
        results.len() as u64,
        index.shards[0].rows + 1,
        "everything before the bad shard, then the error"
    );

    let mut o = opts(Shuffle::Global, 0, 1, 2);
    o.skip_corrupt = true;
    let mut stream = ds.stream(&o, StreamState::default()).expect("stream");
    let got = stream.by_ref().collect::<Result<Vec<_>>>().expect("skips");
    let report = stream.corrupt();
    let bad_rows = s1.rows + s3.rows;
    assert_eq!(report.skipped_samples, bad_rows);
    assert_eq!(got.len() as u64, index.counts.train - bad_rows);
    assert_eq!(
        report.shards.keys().cloned().collect::<Vec<_>>(),
        vec!["shard-00001.arrow", "shard-00003.arrow"]
    );
}

#[test]
fn a_bad_index_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = dataset(work.path(), 100, false);
    let path = out.join(INDEX_FILE);
    let good = std::fs::read_to_string(&path).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
    v["format_version"] = serde_json::json!(99);
    std::fs::write(&path, v.to_string()).expect("write");
    let e = Dataset::open(&out).expect_err("version");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: format_version 99 is not supported (this build reads 1 to 2)",
            path.display()
        )
    );
    let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
    v["shards"][0]["file"] = serde_json::json!("../../etc/passwd");
    std::fs::write(&path, v.to_string()).expect("write");
    let e = Dataset::open(&out).expect_err("traversal");
    assert!(e.to_string().contains("is not a plain, unique file name"), "{e}");
}

/// The fuzz target's entry point over a seed corpus of real shards, truncated and mutated: errors, never panics.
#[test]
fn mutated_shard_bytes_are_errors_never_panics() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = dataset(work.path(), 200, true);
    let seeds: Vec<Vec<u8>> = common::shard_paths(&out)
        .iter()
        .take(2)
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    for seed in &seeds {
        read_shard_bytes(seed).expect("the unmutated shard reads");
    }
    let mut state = 12345u64;
    let (mut ok, mut err) = (0, 0);
    for case in 0..3000u64 {
        state = common::mix(state ^ case);
        let seed = &seeds[(state % seeds.len() as u64) as usize];
        let mut bytes = seed.clone();
        match case % 4 {
            0 => bytes.truncate((state >> 8) as usize % bytes.len()),
            1 => {
                for j in 0..1 + (state >> 60) {
                    let at = (common::mix(state + j) as usize) % bytes.len();
                    bytes[at] ^= 1 << (j % 8);
                }
            }
            2 => {
                let at = (state >> 8) as usize % bytes.len();
                let v = common::mix(state).to_le_bytes();
                for (k, b) in v.iter().enumerate() {
                    if at + k < bytes.len() {
                        bytes[at + k] = *b;
                    }
                }
            }
            _ => {
                let at = (state >> 8) as usize % bytes.len();
                bytes.drain(at..(at + 1 + (state >> 40) as usize % 64).min(bytes.len()));
            }
        }
        match read_shard_bytes(&bytes) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.to_string().starts_with("shard <memory>"), "{e}");
                err += 1;
            }
        }
    }
    assert!(
        err > 2000,
        "most mutations are caught structurally: {ok} ok, {err} errors"
    );
}
