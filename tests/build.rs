//! `imglish build` on the example demo config (fewer images): verify against the build record, stages skipped on
//! a re-run, identical dataset bytes with another thread count and in another directory, and after a kill at a
//! random point.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// This package's directory. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, which stays right when the
/// (shared) target directory holds a binary compiled from another clone of the repository; the compile-time
/// value is the fallback for running the binary by hand.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn imglish(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn imglish")
}

fn ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// sha256 of index.json and every shard of a dataset, concatenated.
fn dataset_hash(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dataset dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n == "index.json" || n.ends_with(".arrow"))
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    names
        .iter()
        .map(|n| format!("{n}:{:x}", Sha256::digest(std::fs::read(dir.join(n)).expect("read"))))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn builds_are_reproducible_resumable_and_verifiable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = std::fs::read_to_string(manifest_dir().join("examples/build/demo.toml")).expect("example config");
    let config = text.replace("images = 240", "images = 80");
    assert!(config.contains("images = 80") && config.contains("[text_tokenizer.fit]"));
    std::fs::write(d.join("demo.toml"), config).expect("write config");

    ok(&imglish(
        d,
        &["--threads", "2", "-q", "build", "demo.toml", "--out", "a"],
    ));
    let a = dataset_hash(&d.join("a/dataset"));
    let verify = imglish(d, &["verify", "a/dataset"]);
    ok(&verify);
    assert!(String::from_utf8_lossy(&verify.stdout).contains("matches its build record"));

    // A second run skips every stage.
    let again = imglish(d, &["build", "demo.toml", "--out", "a"]);
    ok(&again);
    let stdout = String::from_utf8_lossy(&again.stdout);
    for stage in [
        "demo",
        "ingest",
        "tokenizer-fit",
        "text-tokenizer-fit",
        "tokenize",
        "pack",
    ] {
        assert!(
            stdout.contains(&format!("build: {stage} up to date (skipped)")),
            "{stdout}"
        );
    }
    assert_eq!(dataset_hash(&d.join("a/dataset")), a);

    // Another thread count, in a nested directory: the same bytes.
    std::fs::create_dir_all(d.join("elsewhere")).expect("mkdir");
    ok(&imglish(
        &d.join("elsewhere"),
        &["--threads", "1", "-q", "build", "../demo.toml", "--out", "b"],
    ));
    assert_eq!(dataset_hash(&d.join("elsewhere/b/dataset")), a);

    // Killed at a (seeded) random point, then run again: the same bytes.
    let delay = 300 + (u64::from(std::process::id()) * 7919) % 2500;
    let mut child = Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(d)
        .args(["-q", "build", "demo.toml", "--out", "c"])
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(delay));
    let _ = child.kill();
    let _ = child.wait();
    ok(&imglish(d, &["-q", "build", "demo.toml", "--out", "c"]));
    assert_eq!(dataset_hash(&d.join("c/dataset")), a, "after a kill at {delay} ms");

    // A dataset that no longer matches its build record fails verify.
    let record = d.join("a/dataset/build.json");
    let text = std::fs::read_to_string(&record).expect("record");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let sha = v["dataset"]["index_sha256"].as_str().expect("sha").to_string();
    std::fs::write(&record, text.replace(&sha, &"0".repeat(64))).expect("write");
    let bad = imglish(d, &["verify", "a/dataset"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        // (after the progress line that names verify's phase off a terminal)
        String::from_utf8_lossy(&bad.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
        format!(
            "error: a/dataset: index.json has sha256 {sha}, the build record says {}",
            "0".repeat(64)
        )
    );
}

#[test]
fn text_corpora_in_a_build_config_are_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let text = std::fs::read_to_string(manifest_dir().join("examples/build/demo.toml")).expect("example config");
    let config = text.replace("images = 240", "images = 40").replace(
        "captions = [\"{out}/demo/captions/coco_captions.json\"]",
        "captions = [\"{out}/demo/captions/coco_captions.json\"]\ntexts = [\"docs.txt\"]",
    );
    assert!(config.contains("texts = [\"docs.txt\"]"));
    std::fs::write(d.join("demo.toml"), config).expect("write config");
    std::fs::write(
        d.join("docs.txt"),
        "a red circle\na blue square above a ring\nthree small crosses\n",
    )
    .expect("docs");
    ok(&imglish(d, &["-q", "build", "demo.toml", "--out", "a"]));
    let inspect = imglish(d, &["--log-format", "json", "inspect", "a/dataset"]);
    ok(&inspect);
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("line")).expect("json");
    assert_eq!(v["stats"]["kinds"][1], 3, "three text samples: {v}");

    // The text corpus is an input: changing it runs ingest again.
    std::fs::write(d.join("docs.txt"), "a red circle\n").expect("docs");
    let again = imglish(d, &["build", "demo.toml", "--out", "a"]);
    ok(&again);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(!stdout.contains("build: ingest up to date (skipped)"), "{stdout}");
}

/// A misspelled table or key is refused before any stage runs, with a suggestion; no stage output appears.
#[test]
fn misspelled_tables_and_keys_are_refused_before_any_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = "version = 1\n[demo]\nimages = 60\n[ingest]\nimages = [\"{out}/demo/images\"]\n\
                [tokenizer.fit]\ncodebook = 16\n";
    let cases = [
        (
            format!("{base}[tokenise]\nviews = 2\n"),
            "error: c.toml: invalid build config: unknown table `tokenise` (did you mean `tokenize`?); known: \
             version, demo, download, ingest, tokenizer, text_tokenizer, tokenize, pack, upload",
        ),
        (
            format!("{base}[Pack]\nbatch_rows = 64\n"),
            "error: c.toml: invalid build config: unknown table `Pack` (did you mean `pack`?); known: version, \
             demo, download, ingest, tokenizer, text_tokenizer, tokenize, pack, upload",
        ),
        (
            format!("{base}[upload]\nurl = \"work/copy\"\n"),
            "error: c.toml: invalid build config: [upload] url must be an object storage URL (s3://, gs://, az://, \
             https://, http://)",
        ),
        (
            format!("{base}[pack]\nbatch_row = 64\n"),
            "error: c.toml: invalid settings for stage `pack` ([pack] table): unexpected argument '--batch-row' \
             found (tip: a similar argument exists: '--batch-rows')",
        ),
        (
            format!("{base}[text_tokenizer.fit]\nmodel = \"wordpiece\"\n"),
            "error: c.toml: invalid build config: [text_tokenizer.fit] model = \"wordpiece\": its training is not deterministic, and a build \
             must rebuild byte-identically; use model = \"bpe\", or train it once with `imglish tokenizer fit-text` \
             and give the file as [text_tokenizer] file = \"tokenizer.json\"",
        ),
        (
            format!("{base}[tokenizer]\nmodle = \"x.onnx\"\n"),
            "error: c.toml: invalid build config: unknown key of [tokenizer] `modle` (did you mean `model`?); known: \
             model, fit",
        ),
        (
            "version = 1\n[demo]\nimages = 60\n[ingest]\nimages = [\"{out}/demo/images\"]\n[tokenizer.fit]\n\
             codebook = 16\ninput_size = 100\n"
                .to_string(),
            "error: c.toml: invalid settings for stage `tokenizer-fit` ([tokenizer.fit] table): --input-size 100 \
             must be a positive multiple of --patch 8",
        ),
    ];
    for (i, (config, message)) in cases.iter().enumerate() {
        std::fs::write(d.join("c.toml"), config).expect("write");
        let out_dir = format!("b{i}");
        let out = imglish(d, &["build", "c.toml", "--out", &out_dir]);
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), *message);
        assert!(!d.join(&out_dir).join("demo").exists(), "a stage ran");
    }
}

/// A stage that fails at run time is named, and so is the build folder its relative paths start from.
#[test]
fn a_failing_stage_is_named_with_the_folder_its_paths_are_relative_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("empty")).expect("mkdir");
    std::fs::write(
        d.join("c.toml"),
        "version = 1\n[ingest]\nimages = [\"empty\"]\n[tokenizer.fit]\ncodebook = 16\n",
    )
    .expect("write");
    let out = imglish(d, &["-q", "build", "c.toml", "--out", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: build: stage `ingest` failed (its paths are relative to b): ingest accepted nothing: 0 seen, 0 \
         rejected. The manifest in ./manifest is empty; pass --allow-empty to accept that"
    );
}
