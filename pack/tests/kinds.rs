//! Format 2: image, text and pair samples side by side. Text samples (no views, one text) survive parts,
//! packing (with and without pixels), the reader, the stream, `verify` and `stats`.

mod common;

use std::collections::BTreeMap;

use common::*;
use imglish_pack::*;

fn text_record(id: u64) -> TokenRecord {
    TokenRecord {
        sample_id: id,
        views: Vec::new(),
        captions: vec![(0..5 + id % 7).map(|t| ((id * 13 + t) % 5000) as u32).collect()],
        label: None,
        split: if id.is_multiple_of(4) { Split::Val } else { Split::Train },
        pixels: None,
    }
}

fn write_mixed(dir: &std::path::Path, info: &TokenizerInfo, pixels: bool) -> Vec<TokenRecord> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut all = Vec::new();
    let mut w = PartWriter::try_new(dir.join(part_file_name(0)), info).expect("writer");
    for id in 0..90u64 {
        let r = if id.is_multiple_of(3) {
            text_record(id)
        } else {
            record(info, id, pixels)
        };
        w.write(&r).expect("write");
        all.push(r);
    }
    TokensManifest::new(info.clone(), vec![w.finish().expect("finish")])
        .write(dir)
        .expect("manifest");
    all
}

#[test]
fn text_samples_round_trip_through_pack_the_reader_and_the_stream() {
    for pixels in [false, true] {
        let work = tempfile::tempdir().expect("tempdir");
        let info = info(2, [3, 3], 300);
        let written = write_mixed(&work.path().join("tokens"), &info, pixels);
        let config = PackConfig {
            batch_rows: 8,
            target_shard_bytes: 4000,
            include_pixels: pixels,
            ..PackConfig::default()
        };
        let out = work.path().join("ds");
        pack_dataset(&work.path().join("tokens"), None, &out, &config, &|_| {}).expect("pack");
        let ds = Dataset::open(&out).expect("open");
        assert_eq!(ds.index().format_version, 2);
        let report = ds.verify();
        assert!(report.is_ok(), "{report:?}");

        let mut back = BTreeMap::new();
        for i in 0..ds.shards().len() {
            for b in 0..ds.shards()[i].batches as usize {
                for r in ds.batch_records(i, b).expect("records") {
                    back.insert(r.sample_id, r);
                }
            }
        }
        let expected: BTreeMap<u64, TokenRecord> = written.iter().map(|r| (r.sample_id, r.clone())).collect();
        assert_eq!(back, expected);
        assert_eq!(back.values().filter(|r| r.kind() == SampleKind::Text).count(), 30);

        let samples = ds
            .stream(
                &StreamOptions {
                    split: Some(Split::Train),
                    ..StreamOptions::default()
                },
                StreamState::default(),
            )
            .expect("stream")
            .collect::<Result<Vec<_>>>()
            .expect("samples");
        for s in &samples {
            let r = &expected[&s.sample_id];
            assert_eq!(s.kind, r.kind());
            if s.kind == SampleKind::Text {
                assert!(s.tokens.is_empty() && s.pixels.is_none());
                assert_eq!(s.captions, r.captions);
            } else {
                assert_eq!(s.tokens.len(), 9);
            }
        }
        // The code histogram counts the views of image and pair samples only.
        let stats = ds.stats().expect("stats");
        assert_eq!(stats.token_bytes, 60 * 2 * 9 * 2);
        let pairs = written.iter().filter(|r| r.kind() == SampleKind::Pair).count() as u64;
        assert_eq!(stats.kinds, [60 - pairs, 30, pairs]);
    }
}

#[test]
fn a_text_sample_must_have_exactly_one_text() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(1, [2, 2], 64);
    let mut w = PartWriter::try_new(work.path().join(part_file_name(0)), &info).expect("writer");
    let mut bad = text_record(7);
    bad.captions.push(vec![1, 2]);
    let e = w.write(&bad).expect_err("two texts");
    assert_eq!(
        e.to_string(),
        "sample 7: is a text sample (no views) but does not have exactly one non-empty text and no pixels"
    );
}

#[test]
fn a_pack_that_fails_midway_leaves_no_temporary_shard() {
    let work = tempfile::tempdir().expect("tempdir");
    let info = info(1, [2, 2], 64);
    let tokens = work.path().join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let mut w = PartWriter::try_new(tokens.join(part_file_name(0)), &info).expect("writer");
    // The first 40 samples carry pixels, the rest do not: `--include-pixels` fails once a shard is open.
    for id in 0..60u64 {
        let mut r = record(&info, id, id < 40);
        r.split = Split::Train;
        w.write(&r).expect("write");
    }
    TokensManifest::new(info.clone(), vec![w.finish().expect("finish")])
        .write(&tokens)
        .expect("manifest");
    let out = work.path().join("ds");
    let config = PackConfig {
        batch_rows: 8,
        include_pixels: true,
        ..PackConfig::default()
    };
    let e = pack_dataset(&tokens, None, &out, &config, &|_| {}).expect_err("samples without pixels");
    assert!(
        e.to_string().starts_with("sample 40: its token part holds no pixels"),
        "{e}"
    );
    let left: Vec<String> = std::fs::read_dir(&out)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|f| !f.ends_with(".tmp") && !f.starts_with("shard-")),
        "{left:?}"
    );
    assert!(!out.join(INDEX_FILE).exists());
}
