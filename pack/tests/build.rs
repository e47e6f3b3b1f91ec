//! The pack builder and the shard format: round trips, determinism, resume, interop with plain Arrow.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{dir_hashes, info, record, shard_paths, write_parts};
use imglish_pack::*;

fn config(seed: Option<u64>) -> PackConfig {
    PackConfig {
        target_shard_bytes: 6_000,
        batch_rows: 32,
        zstd_level: 3,
        shuffle_seed: seed,
        include_pixels: true,
    }
}

fn all_records(ds: &Dataset) -> Vec<TokenRecord> {
    let mut v = Vec::new();
    for (i, s) in ds.shards().iter().enumerate() {
        for b in 0..s.batches as usize {
            v.extend(ds.batch_records(i, b).expect("batch"));
        }
    }
    v
}

#[test]
fn pack_without_shuffle_keeps_part_order_and_every_field() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(2, [4, 4], 1024);
    let ids: Vec<u64> = (0..500).map(|i| i * 7 + 3).collect();
    write_parts(&work.path().join("tokens"), &info, &ids, 120, true);
    let out = work.path().join("ds");
    let s = pack_dataset(&work.path().join("tokens"), None, &out, &config(None), &|_| {}).expect("pack");
    assert!(s.shards > 2, "small target makes several shards: {s:?}");
    assert_eq!(s.counts, SplitCounts { train: 450, val: 50 });

    let ds = Dataset::open(&out).expect("open");
    let expect: Vec<TokenRecord> = Split::ALL
        .iter()
        .flat_map(|&split| {
            ids.iter()
                .map(|&id| record(&info, id, true))
                .filter(move |r| r.split == split)
        })
        .collect();
    assert_eq!(all_records(&ds), expect);
    // Train shards first, each shard holds one split, batches of 32 except a shard's last.
    let splits: Vec<Split> = ds.shards().iter().map(|s| s.split).collect();
    assert!(splits.windows(2).all(|w| w[0] <= w[1]), "{splits:?}");
    for (i, s) in ds.shards().iter().enumerate() {
        assert_eq!(s.file, shard_file_name(i));
        assert_eq!(s.bytes, std::fs::metadata(out.join(&s.file)).expect("stat").len());
    }
    assert_eq!(ds.get(451).expect("get"), expect[451]);
    assert_eq!(ds.find(ids[17]).expect("find"), Some(record(&info, ids[17], true)));
    assert_eq!(ds.find(1).expect("find"), None);
    assert!(ds.verify().is_ok());
    assert!(!out.join(PROGRESS_FILE).exists());
}

#[test]
fn shuffled_pack_is_a_permutation_independent_of_part_layout() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(1, [3, 3], 300);
    let ids: Vec<u64> = (0..400).collect();
    let mut reversed = ids.clone();
    reversed.reverse();
    write_parts(&work.path().join("a"), &info, &ids, 50, false);
    write_parts(&work.path().join("b"), &info, &reversed, 170, false);
    let mut cfg = config(Some(11));
    cfg.include_pixels = false;
    pack_dataset(&work.path().join("a"), None, &work.path().join("da"), &cfg, &|_| {}).expect("pack a");
    pack_dataset(&work.path().join("b"), None, &work.path().join("db"), &cfg, &|_| {}).expect("pack b");
    let a = all_records(&Dataset::open(work.path().join("da")).expect("open"));
    let b = all_records(&Dataset::open(work.path().join("db")).expect("open"));
    assert_eq!(a, b, "the shuffled order depends on sample ids only");
    let mut got: Vec<u64> = a.iter().map(|r| r.sample_id).collect();
    let train_ids: Vec<u64> = got.iter().copied().take(360).collect();
    assert_ne!(
        train_ids,
        (0..400).filter(|i| i % 10 != 9).collect::<Vec<_>>(),
        "actually shuffled"
    );
    got.sort_unstable();
    assert_eq!(got, ids);
    for r in &a {
        assert_eq!(*r, record(&info, r.sample_id, false));
    }
}

#[test]
fn duplicate_sample_ids_are_refused_when_shuffling() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(1, [2, 2], 64);
    write_parts(&work.path().join("t"), &info, &[1, 2, 3, 2, 5], 10, false);
    let e = pack_dataset(
        &work.path().join("t"),
        None,
        &work.path().join("d"),
        &config(Some(1)),
        &|_| {},
    )
    .expect_err("duplicate");
    assert_eq!(e.to_string(), "sample 2 appears more than once in the token parts");
}

fn build_in_pool(threads: usize, tokens: &Path, out: &Path, cfg: &PackConfig) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    pool.install(|| pack_dataset(tokens, None, out, cfg, &|_| {}))
        .expect("pack");
}

#[test]
fn builds_are_byte_identical_whatever_the_thread_count() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(2, [4, 4], 1024);
    let ids: Vec<u64> = (0..700).collect();
    let tokens = work.path().join("tokens");
    write_parts(&tokens, &info, &ids, 90, true);
    for seed in [None, Some(5)] {
        let cfg = config(seed);
        let (one, four) = (
            work.path().join(format!("one-{seed:?}")),
            work.path().join(format!("four-{seed:?}")),
        );
        build_in_pool(1, &tokens, &one, &cfg);
        build_in_pool(4, &tokens, &four, &cfg);
        let (h1, h4) = (dir_hashes(&one), dir_hashes(&four));
        assert!(h1.len() > 3, "{h1:?}");
        assert_eq!(h1, h4);
    }
}

#[test]
fn build_fingerprint_covers_inputs_config_and_manifest() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(1, [2, 2], 64);
    let tokens = work.path().join("tokens");
    write_parts(&tokens, &info, &(0..50).collect::<Vec<_>>(), 50, true);
    let manifest = work.path().join("manifest");
    std::fs::create_dir_all(&manifest).expect("mkdir");
    std::fs::write(manifest.join("ingest.json"), r#"{"fingerprint": "abc", "other": 1}"#).expect("write");
    assert_eq!(manifest_fingerprint(&manifest).expect("fp"), Some("abc".to_string()));

    let fp = |m: Option<&Path>, cfg: &PackConfig, name: &str| {
        pack_dataset(&tokens, m, &work.path().join(name), cfg, &|_| {})
            .expect("pack")
            .build_fingerprint
    };
    let base = fp(None, &config(None), "a");
    assert_eq!(base, fp(None, &config(None), "b"));
    assert_ne!(base, fp(Some(&manifest), &config(None), "c"));
    assert_ne!(base, fp(None, &config(Some(0)), "d"));
    let index = DatasetIndex::read(&work.path().join("c")).expect("index");
    assert_eq!(index.manifest_fingerprint.as_deref(), Some("abc"));

    // Same dir again: up to date, nothing rewritten. Other settings into the same dir: refused.
    let again = pack_dataset(&tokens, None, &work.path().join("a"), &config(None), &|_| {}).expect("again");
    assert!(again.up_to_date);
    let e = pack_dataset(&tokens, None, &work.path().join("a"), &config(Some(3)), &|_| {}).expect_err("conflict");
    assert!(
        e.to_string().ends_with(
            "already holds a dataset built from other inputs or settings (remove it or choose another --out)"
        ),
        "{e}"
    );
    // A changed part is caught by its hash.
    let part = tokens.join(part_file_name(0));
    let mut bytes = std::fs::read(&part).expect("read");
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&part, bytes).expect("write");
    let e = pack_dataset(&tokens, None, &work.path().join("e"), &config(None), &|_| {}).expect_err("hash");
    assert!(
        e.to_string().starts_with(&format!("{}: sha256 is ", part.display())),
        "{e}"
    );
}

#[test]
fn an_interrupted_build_resumes_keeping_verified_shards() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(2, [4, 4], 1024);
    let tokens = work.path().join("tokens");
    write_parts(&tokens, &info, &(0..600).collect::<Vec<_>>(), 100, true);
    let cfg = config(Some(2));
    let out = work.path().join("ds");
    pack_dataset(&tokens, None, &out, &cfg, &|_| {}).expect("pack");
    let complete = dir_hashes(&out);
    let index = DatasetIndex::read(&out).expect("index");
    assert!(index.shards.len() >= 6);

    // Simulate a crash after 4 shards, with a half-written 5th, and the 3rd one damaged on disk.
    std::fs::remove_file(out.join(INDEX_FILE)).expect("rm index");
    for s in &index.shards[4..] {
        std::fs::remove_file(out.join(&s.file)).expect("rm shard");
    }
    std::fs::write(out.join(".shard-00004.arrow.tmp"), b"partial").expect("tmp");
    let progress = serde_json::json!({"build_fingerprint": index.build_fingerprint, "shards": &index.shards[..4]});
    std::fs::write(out.join(PROGRESS_FILE), progress.to_string()).expect("progress");
    let s = pack_dataset(&tokens, None, &out, &cfg, &|_| {}).expect("resume");
    assert_eq!(s.reused_shards, 4);
    assert_eq!(dir_hashes(&out), complete);

    let third = out.join(&index.shards[2].file);
    std::fs::remove_file(out.join(INDEX_FILE)).expect("rm index");
    std::fs::write(out.join(PROGRESS_FILE), progress.to_string()).expect("progress");
    let mut bytes = std::fs::read(&third).expect("read");
    bytes[100] ^= 0x40;
    std::fs::write(&third, bytes).expect("write");
    let s = pack_dataset(&tokens, None, &out, &cfg, &|_| {}).expect("resume");
    assert_eq!(s.reused_shards, 2, "shards from the damaged one on are rewritten");
    assert_eq!(dir_hashes(&out), complete);
}

#[test]
fn shards_are_plain_arrow_ipc_files_readable_without_imglish() {
    use arrow::array::{Array, FixedSizeListArray, UInt16Array, UInt64Array};
    use arrow::ipc::reader::FileReader;
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(2, [3, 4], 512);
    let tokens = work.path().join("tokens");
    write_parts(&tokens, &info, &(0..100).collect::<Vec<_>>(), 100, true);
    let out = work.path().join("ds");
    pack_dataset(&tokens, None, &out, &config(None), &|_| {}).expect("pack");
    let mut seen = BTreeMap::new();
    for path in shard_paths(&out) {
        let reader = FileReader::try_new(std::fs::File::open(&path).expect("open"), None).expect("arrow reader");
        let schema = reader.schema();
        assert_eq!(schema.metadata()["imglish.format_version"], "2");
        assert_eq!(schema.metadata()["imglish.grid"], "3x4");
        assert_eq!(schema.metadata()["imglish.views_per_sample"], "2");
        for batch in reader {
            let batch = batch.expect("batch");
            let ids = batch
                .column_by_name("sample_id")
                .expect("ids")
                .as_any()
                .downcast_ref::<UInt64Array>()
                .expect("u64");
            let tokens = batch
                .column_by_name("tokens")
                .expect("tokens")
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .expect("fsl");
            assert_eq!(tokens.value_length(), 2);
            for row in 0..batch.num_rows() {
                let views = tokens.value(row);
                let views = views.as_any().downcast_ref::<FixedSizeListArray>().expect("views");
                let v1 = views.value(1);
                let v1 = v1.as_any().downcast_ref::<UInt16Array>().expect("u16");
                seen.insert(ids.value(row), v1.values().to_vec());
            }
        }
    }
    assert_eq!(seen.len(), 100);
    for (id, toks) in seen {
        assert_eq!(toks, record(&info, id, false).views[1].tokens);
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn prop_pack_round_trip(
            n in 1usize..300,
            per_part in 1usize..120,
            batch_rows in 1u32..50,
            target in 500u64..20_000,
            seed in proptest::option::of(any::<u64>()),
            views in 1u32..4,
        ) {
            let work = tempfile::tempdir().expect("tempdir");
            let info = info(views, [2, 3], 200);
            let ids: Vec<u64> = (0..n as u64).map(common::mix).collect();
            write_parts(&work.path().join("t"), &info, &ids, per_part, false);
            let cfg = PackConfig { target_shard_bytes: target, batch_rows, zstd_level: 1, shuffle_seed: seed, include_pixels: false };
            pack_dataset(&work.path().join("t"), None, &work.path().join("d"), &cfg, &|_| {}).expect("pack");
            let ds = Dataset::open(work.path().join("d")).expect("open");
            let mut back = all_records(&ds);
            back.sort_by_key(|r| r.sample_id);
            let mut expect: Vec<TokenRecord> = ids.iter().map(|&id| record(&info, id, false)).collect();
            expect.sort_by_key(|r| r.sample_id);
            prop_assert_eq!(back, expect);
            // Standalone reads of each shard's bytes agree with the indexed reader.
            let mut total = 0;
            for p in shard_paths(&work.path().join("d")) {
                let (i, recs) = read_shard_bytes(&std::fs::read(&p).expect("read")).expect("standalone");
                prop_assert_eq!(&i, &info);
                total += recs.len();
            }
            prop_assert_eq!(total, n);
        }
    }
}
