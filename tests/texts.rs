//! Text-only corpora through the real binary: `ingest --texts` (every bad line a reject with its reason, counts
//! adding up), `tokenize` cutting long documents into segments (none dropped), `pack` (format 2, text rows),
//! `train --model beit3` learning from them, and BEiT passing them over.

use std::path::Path;
use std::process::{Command, Output};

fn imglish(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn imglish")
}

fn ok(args: &[&str], out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("summary")).expect("json summary")
}

fn run(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--log-format", "json", "--threads", "1"];
    full.extend(args);
    ok(args, &imglish(dir, &full))
}

#[test]
fn text_corpora_are_ingested_segmented_packed_and_trained_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    // 60 documents of 1..=60 words, a duplicate, an empty line, a line that is not UTF-8, an oversized line.
    let words = ["red", "circle", "blue", "square", "small", "large", "above", "below"];
    let mut text = Vec::new();
    for i in 0..60usize {
        let doc: Vec<&str> = (0..=i).map(|j| words[(i * 7 + j * 3) % words.len()]).collect();
        text.extend_from_slice(doc.join(" ").as_bytes());
        text.push(b'\n');
    }
    text.extend_from_slice(b"red\n\n\xff\xfe\n");
    text.extend_from_slice(&[b'a'; 3000]);
    text.push(b'\n');
    std::fs::write(d.join("docs.txt"), &text).expect("write");
    std::fs::write(d.join("docs.jsonl"), "{\"body\": \"a blue square\"}\n{\"body\": 7}\n").expect("write");

    run(d, &["demo-corpus", "--out", "demo", "--images", "40"]);
    let ingest = run(
        d,
        &[
            "ingest",
            "--images",
            "demo/images",
            "--captions",
            "demo/captions/coco_captions.json",
            "--texts",
            "docs.txt",
            "docs.jsonl",
            "--text-field",
            "body",
            "--max-text-bytes",
            "2000",
            "--out",
            "manifest",
        ],
    );
    let c = &ingest["counts"];
    assert_eq!(c["texts"], 61, "{c}");
    // The duplicate ("red" is document 0), the empty line, the bad UTF-8, the oversized line, the non-string.
    for (reason, n) in [
        ("duplicate", 1),
        ("empty", 1),
        ("invalid-utf8", 1),
        ("too-large", 1),
        ("bad-record", 1),
    ] {
        assert!(c["by_reason"][reason].as_u64().unwrap_or(0) >= n, "{reason}: {c}");
    }
    assert_eq!(
        c["seen"].as_u64(),
        Some(c["accepted"].as_u64().expect("a") + c["rejected"].as_u64().expect("r"))
    );

    run(
        d,
        &[
            "tokenizer",
            "fit-text",
            "--manifest",
            "manifest",
            "--vocab-size",
            "300",
            "--out",
            "tok/text.json",
        ],
    );
    run(
        d,
        &[
            "tokenizer",
            "fit",
            "--manifest",
            "manifest",
            "--patch",
            "8",
            "--input-size",
            "32",
            "--codebook",
            "16",
            "--out",
            "tok/visual.onnx",
        ],
    );
    let tokenize = run(
        d,
        &[
            "tokenize",
            "--manifest",
            "manifest",
            "--tokenizer",
            "tok/visual.onnx",
            "--text-tokenizer",
            "tok/text.json",
            "--views",
            "1",
            "--max-text-len",
            "16",
            "--out",
            "tokens",
        ],
    );
    assert_eq!(tokenize["texts"], 61);
    let segments = tokenize["text_segments"].as_u64().expect("segments");
    assert!(
        tokenize["texts_cut"].as_u64().expect("cut") > 20 && segments > 90,
        "{tokenize}"
    );

    run(d, &["pack", "--tokens", "tokens", "--out", "dataset"]);
    let verify = imglish(d, &["verify", "dataset"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("dataset/index.json")).expect("index")).expect("json");
    assert_eq!(index["format_version"], 2);
    let total = index["counts"]["train"].as_u64().expect("train") + index["counts"]["val"].as_u64().expect("val");
    let manifest_images = ingest["counts"]["accepted"].as_u64().expect("accepted") - 61;
    assert_eq!(
        total,
        manifest_images + segments,
        "every segment is a sample, none dropped"
    );

    let train = run(
        d,
        &[
            "train",
            "--model",
            "beit3",
            "--dataset",
            "dataset",
            "--out",
            "run3",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--mix",
            "image=0,text=1,pair=0",
            "--lr",
            "3e-3",
        ],
    );
    let (first, last) = (
        &train["initial_val"]["tasks"]["text_mlm"],
        &train["final_val"]["tasks"]["text_mlm"],
    );
    assert!(
        last["loss"].as_f64().expect("last") < first["loss"].as_f64().expect("first"),
        "{first} -> {last}"
    );
    assert!(
        train["final_val"]["tasks"]["image_mim"].is_null(),
        "images have weight 0"
    );

    // BEiT passes the text samples over and trains on the images.
    run(
        d,
        &[
            "train",
            "--dataset",
            "dataset",
            "--out",
            "run1",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--steps",
            "3",
        ],
    );
}
