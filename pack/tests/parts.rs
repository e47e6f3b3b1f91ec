//! Token parts: round trips, validation, `tokenize.json`.

mod common;

use common::{info, record};
use imglish_pack::*;
use proptest::prelude::*;

#[test]
fn part_round_trip_keeps_every_field_and_the_tokenizer_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info = info(3, [4, 5], 1000);
    let records: Vec<TokenRecord> = (0..1300).map(|id| record(&info, id * 3 + 1, id % 2 == 0)).collect();
    let path = dir.path().join(part_file_name(7));
    let mut w = PartWriter::try_new(&path, &info).expect("writer");
    for r in &records {
        w.write(r).expect("write");
    }
    assert!(!path.exists(), "the part appears only when finished");
    let entry = w.finish().expect("finish");
    assert_eq!(entry.file, "part-00007.parquet");
    assert_eq!(entry.rows, 1300);
    assert_eq!(entry.counts.total(), 1300);
    assert_eq!(
        entry.counts.val,
        records.iter().filter(|r| r.split == Split::Val).count() as u64
    );
    assert_eq!(entry.bytes, std::fs::metadata(&path).expect("stat").len());
    let (back_info, back) = read_part(&path).expect("read");
    assert_eq!(back_info, info);
    assert_eq!(back, records);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
}

#[test]
fn part_writer_rejects_records_that_do_not_fit_the_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info = info(2, [2, 2], 100);
    let mut w = PartWriter::try_new(dir.path().join("p.parquet"), &info).expect("writer");
    let good = record(&info, 5, false);

    let mut r = good.clone();
    r.views.pop();
    let e = w.write(&r).expect_err("one view missing");
    assert_eq!(e.to_string(), "sample 5: has 1 views, the tokenizer info says 2");

    let mut r = good.clone();
    r.views[1].tokens.push(0);
    let e = w.write(&r).expect_err("grid mismatch");
    assert_eq!(e.to_string(), "sample 5: view 1 has 5 tokens, the grid 2x2 needs 4");

    let mut r = good.clone();
    r.views[0].tokens[3] = 100;
    let e = w.write(&r).expect_err("token out of vocabulary");
    assert_eq!(
        e.to_string(),
        "sample 5: view 0 has token 100, not below vocab_size 100"
    );

    let mut r = good.clone();
    r.captions = vec![vec![1, 5000]];
    let e = w.write(&r).expect_err("caption token out of vocabulary");
    assert_eq!(
        e.to_string(),
        "sample 5: caption 0 has token 5000, not below text_vocab_size 5000"
    );

    w.write(&good).expect("a good record still goes in");
    assert_eq!(w.rows(), 1);
}

#[test]
fn invalid_tokenizer_info_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = info(2, [2, 2], 100);
    bad.vocab_size = 70000;
    let e = PartWriter::try_new(dir.path().join("p.parquet"), &bad).expect_err("u16 tokens");
    assert_eq!(
        e.to_string(),
        "invalid tokenizer info: vocab_size 70000 must be in 1..=65536 (tokens are u16)"
    );
}

#[test]
fn tokens_manifest_round_trip_and_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info = info(1, [3, 3], 256);
    let ids: Vec<u64> = (0..95).collect();
    let mut m = common::write_parts(dir.path(), &info, &ids, 40, false);
    assert_eq!(m.parts.len(), 3);
    assert_eq!(m.counts.total(), 95);
    assert_eq!(m.counts.val, 9);
    m.extra
        .insert("tokenize_config".into(), serde_json::json!({"views": 1}));
    m.write(dir.path()).expect("write");
    assert_eq!(TokensManifest::read(dir.path()).expect("read"), m);

    let mut bad = m.clone();
    bad.counts.train += 1;
    bad.write(dir.path()).expect("write");
    let e = TokensManifest::read(dir.path()).expect_err("counts differ");
    assert!(e.to_string().contains("differ from the parts' sum"), "{e}");

    let mut bad = m.clone();
    bad.parts[0].file = "../escape.parquet".into();
    bad.write(dir.path()).expect("write");
    let e = TokensManifest::read(dir.path()).expect_err("path traversal");
    assert!(e.to_string().contains("is not a plain file name"), "{e}");
}

#[test]
fn a_part_file_that_is_not_a_part_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("part-00000.parquet");
    std::fs::write(&path, b"PAR1 but not really").expect("write");
    let e = PartReader::open(&path).expect_err("garbage");
    assert!(
        e.to_string().starts_with(&format!("token part {}: ", path.display())),
        "{e}"
    );
}

fn arb_record(info: TokenizerInfo) -> impl Strategy<Value = TokenRecord> {
    let g = info.tokens_per_view();
    let k = info.views();
    let vocab = info.vocab_size as u16;
    let view = (any::<[u32; 4]>(), any::<bool>(), proptest::collection::vec(0..vocab, g)).prop_map(
        |(mut crop, flip, tokens)| {
            crop[2] = crop[2].max(1);
            crop[3] = crop[3].max(1);
            ViewRecord { crop, flip, tokens }
        },
    );
    (
        any::<u64>(),
        proptest::collection::vec(view, k),
        proptest::collection::vec(proptest::collection::vec(0u32..5000, 0..12), 0..4),
        any::<Option<i32>>(),
        any::<bool>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
    )
        .prop_map(|(sample_id, views, captions, label, val, pixels)| TokenRecord {
            sample_id,
            views,
            captions,
            label,
            split: if val { Split::Val } else { Split::Train },
            pixels,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn prop_part_round_trip(records in proptest::collection::vec(arb_record(info(2, [3, 2], 300)), 0..1200)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = info(2, [3, 2], 300);
        let path = dir.path().join("p.parquet");
        let mut w = PartWriter::try_new(&path, &info).expect("writer");
        for r in &records {
            w.write(r).expect("write");
        }
        let entry = w.finish().expect("finish");
        prop_assert_eq!(entry.rows, records.len() as u64);
        let (_, back) = read_part(&path).expect("read");
        prop_assert_eq!(back, records);
    }
}
