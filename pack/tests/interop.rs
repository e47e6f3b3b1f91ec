//! Interop: shards read by polars' own IPC reader (Python polars from `scripts/setup-libtorch`'s venv, no
//! imglish code) hold exactly the values that were written.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use imglish_pack::{pack_dataset, Dataset, PackConfig};
use sha2::{Digest, Sha256};

/// This package's directory. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, which stays right when the
/// (shared) target directory holds a binary compiled from another clone of the repository; the compile-time
/// value is the fallback for running the binary by hand.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn python() -> PathBuf {
    let repo = manifest_dir().join("..");
    let out = Command::new(repo.join("scripts/setup-libtorch"))
        .arg("--python")
        .output()
        .expect("scripts/setup-libtorch --python");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.exists(), "{} is missing: run scripts/setup", path.display());
    path
}

#[test]
fn polars_reads_our_shards_with_the_written_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info = common::info(3, [4, 5], 700);
    let ids: Vec<u64> = (0..150).map(|i| i * 1_000_003 + 7).collect();
    common::write_parts(&dir.path().join("tokens"), &info, &ids, 60, true);
    let config = PackConfig {
        batch_rows: 32,
        target_shard_bytes: 20_000,
        include_pixels: true,
        ..PackConfig::default()
    };
    let out = dir.path().join("dataset");
    pack_dataset(&dir.path().join("tokens"), None, &out, &config, &|_| {}).expect("pack");
    let dataset = Dataset::open(&out).expect("open");
    assert!(dataset.shards().len() > 1, "several shards");

    let shards = common::shard_paths(&out);
    let output = Command::new(python())
        .arg(manifest_dir().join("tests/interop_read.py"))
        .args(&shards)
        .output()
        .expect("run polars");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: BTreeMap<u64, serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .map(|v| (v["sample_id"].as_u64().expect("id"), v))
        .collect();
    assert_eq!(rows.len(), ids.len());
    for &id in &ids {
        let want = common::record(&info, id, true);
        let got = &rows[&id];
        let tokens: Vec<Vec<u16>> = want.views.iter().map(|v| v.tokens.clone()).collect();
        assert_eq!(got["tokens"], serde_json::json!(tokens), "sample {id}");
        let crops: Vec<[u32; 4]> = want.views.iter().map(|v| v.crop).collect();
        assert_eq!(got["crops"], serde_json::json!(crops), "sample {id}");
        let flips: Vec<bool> = want.views.iter().map(|v| v.flip).collect();
        assert_eq!(got["flips"], serde_json::json!(flips), "sample {id}");
        assert_eq!(got["captions"], serde_json::json!(want.captions), "sample {id}");
        assert_eq!(got["label"], serde_json::json!(want.label), "sample {id}");
        assert_eq!(got["split"], serde_json::json!(want.split.code()), "sample {id}");
        let sha = want.pixels.as_ref().map(|p| format!("{:x}", Sha256::digest(p)));
        assert_eq!(got["pixels_sha256"], serde_json::json!(sha), "sample {id}");
    }
}
