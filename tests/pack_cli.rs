//! End to end: token parts written with `PartWriter`, then `imglish pack`, `verify` and `inspect` as processes.

use std::path::Path;

use sha2::{Digest, Sha256};

mod common;

use common::{imglish, mix, text, write_tokens};

fn hashes(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| {
            let e = e.expect("entry");
            let h: String = Sha256::digest(std::fs::read(e.path()).expect("read"))
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (e.file_name().to_string_lossy().into_owned(), h)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn pack_verify_inspect_and_a_corrupt_shard() {
    let work = tempfile::tempdir().expect("tempdir");
    let tokens = work.path().join("tokens");
    write_tokens(&tokens, 300);
    let (t, d1, d2) = (
        tokens.to_str().expect("utf8"),
        work.path().join("d1"),
        work.path().join("d2"),
    );
    let common = [
        "--batch-rows",
        "16",
        "--target-shard-bytes",
        "3000",
        "--shuffle-seed",
        "9",
    ];

    let mut args = vec![
        "pack",
        "--tokens",
        t,
        "--out",
        d1.to_str().expect("utf8"),
        "--threads",
        "1",
    ];
    args.extend(common);
    let o = imglish(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.starts_with("pack: 300 samples (240 train, 60 val) in "),
        "{stdout}"
    );

    let mut args = vec![
        "pack",
        "--tokens",
        t,
        "--out",
        d2.to_str().expect("utf8"),
        "--threads",
        "2",
    ];
    args.extend(common);
    let o = imglish(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let h = hashes(&d1);
    assert!(h.len() > 4, "several shards: {h:?}");
    assert_eq!(h, hashes(&d2), "identical bytes whatever --threads");

    // Packing again into the same directory is a no-op; other settings are refused.
    let mut args = vec!["pack", "--tokens", t, "--out", d1.to_str().expect("utf8")];
    args.extend(common);
    let o = imglish(&args);
    assert!(
        o.status.success() && text(&o.stdout).contains("(already up to date)"),
        "{}",
        text(&o.stdout)
    );
    let o = imglish(&["pack", "--tokens", t, "--out", d1.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("already holds a dataset built from other inputs or settings"),
        "{}",
        text(&o.stderr)
    );

    let o = imglish(&["verify", d1.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains(" ok: "), "{}", text(&o.stdout));

    let o = imglish(&["inspect", d1.to_str().expect("utf8"), "--sample", "7"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    for needle in [
        "samples           300 (240 train, 60 val)",
        "compression",
        "codes used        40 of 512",
        "sample 7: split train",
    ] {
        assert!(s.contains(needle), "{needle:?} not in\n{s}");
    }
    // The sample drawn: 2 views of a 4x4 grid (cells of 56 px), no pixels in this dataset.
    let png = work.path().join("sample-7.png");
    let o = imglish(&[
        "inspect",
        d1.to_str().expect("utf8"),
        "--sample",
        "7",
        "--png",
        png.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("token grids only: the dataset has no pixels (pack with --include-pixels)"),
        "{}",
        text(&o.stdout)
    );
    let sheet = image::open(&png).expect("a PNG").to_rgb8();
    assert_eq!(sheet.dimensions(), (8 + 2 * (224 + 8), 8 + 224 + 8));
    let cell = |view: u32, t: u32| *sheet.get_pixel(8 + view * 232 + (t % 4) * 56 + 28, 8 + (t / 4) * 56 + 28);
    let mut colours = std::collections::HashMap::new();
    for view in 0..2u64 {
        for t in 0..16u64 {
            let code = mix(7 * 64 + view * 16 + t) % 40;
            let c = cell(view as u32, t as u32);
            assert_eq!(*colours.entry(code).or_insert(c), c, "code {code} drawn in two colours");
        }
    }
    let distinct: std::collections::HashSet<_> = colours.values().collect();
    assert_eq!(distinct.len(), colours.len(), "different codes share a colour");
    let o = imglish(&[
        "inspect",
        d1.to_str().expect("utf8"),
        "--png",
        png.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(2), "--png needs --sample or --key");
    let o = imglish(&["inspect", d1.to_str().expect("utf8"), "--sample", "100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("sample 100000 is not in "),
        "{}",
        text(&o.stderr)
    );

    let o = imglish(&["--log-format", "json", "inspect", d1.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(j["stats"]["counts"]["train"], 240);
    assert_eq!(j["stats"]["captions_per_sample"]["max"], 2);
    assert_eq!(j["stats"]["token_bytes"], 300 * 2 * 16 * 2);
    let bytes = j["stats"]["bytes"].as_f64().expect("bytes");
    let ratio = j["stats"]["compression_ratio"].as_f64().expect("ratio");
    assert!((ratio - 19200.0 / bytes).abs() < 1e-9, "{ratio} vs {bytes}");

    // Damage one shard: verify exits 1 and names it (and only it).
    let victim = d1.join("shard-00002.arrow");
    let mut bytes = std::fs::read(&victim).expect("read");
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(&victim, bytes).expect("write");
    let o = imglish(&["verify", d1.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("1 of ") && err.contains("shards bad (shard-00002.arrow)"),
        "{err}"
    );
    assert!(err.contains("shard shard-00002.arrow: sha256 is "), "{err}");
    // Training reports the stream worker's own error (which shard, which hash), not that a worker stopped.
    let run_dir = work.path().join("run");
    let o = imglish(&[
        "train",
        "--dataset",
        d1.to_str().expect("utf8"),
        "--out",
        run_dir.to_str().expect("utf8"),
        "--steps",
        "50",
        "--batch-size",
        "4",
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("error: training on ") && l.contains("shard shard-00002.arrow: sha256 is ")),
        "{err}"
    );

    let o = imglish(&["pack", "--tokens", t]);
    assert_eq!(o.status.code(), Some(2), "usage error");
}

#[test]
fn include_pixels_over_parts_without_pixels_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let tokens = work.path().join("tokens");
    write_tokens(&tokens, 40);
    let out = work.path().join("dataset");
    let o = imglish(&[
        "pack",
        "--tokens",
        tokens.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--include-pixels",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let stderr = text(&o.stderr);
    assert!(
        stderr.trim().ends_with(
            "sample 1: its token part holds no pixels, and --include-pixels needs them: make the token parts with \
             `imglish tokenize --keep-pixels`"
        ),
        "{stderr}"
    );
    // Nothing that a later stage could read is left behind.
    assert!(!out.join("index.json").exists());
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|f| !f.ends_with(".arrow") && !f.ends_with(".tmp")),
        "{leftovers:?}"
    );
}

#[test]
fn a_second_writer_on_a_folder_is_refused_at_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let tokens = work.path().join("tokens");
    write_tokens(&tokens, 20);
    let out = work.path().join("dataset");
    std::fs::create_dir_all(&out).expect("mkdir");
    // This process plays the first writer: it holds the folder's lock as a running stage does.
    let held = std::fs::File::open(&out).expect("open");
    held.lock().expect("lock");
    let args = [
        "pack",
        "--tokens",
        tokens.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ];
    let o = imglish(&args);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr).trim(),
        format!(
            "error: another imglish process (pid {}) is writing {}; wait for it to finish or stop it",
            std::process::id(),
            out.display()
        )
    );
    assert!(
        std::fs::read_dir(&out).expect("ls").next().is_none(),
        "the refused run wrote nothing"
    );
    // Once the first writer is gone (here: unlocked; a killed process releases it too), the folder is free.
    held.unlock().expect("unlock");
    let o = imglish(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

/// `train --init`: a run starts from another run's weights (reported), not again on --resume; a file made for
/// another model size is refused naming the tensor, before any step.
#[test]
fn train_init_from_a_checkpoint_and_a_misfit() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = |p: &str| work.path().join(p).to_str().expect("utf8").to_string();
    write_tokens(&work.path().join("tokens"), 60);
    let o = imglish(&["-q", "pack", "--tokens", &w("tokens"), "--out", &w("ds")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let small = ["--steps", "2", "--batch-size", "4", "--depth", "1", "--heads", "2"];
    let ds = w("ds");
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--dataset", ds.as_str(), "--out", out];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        imglish(&args)
    };
    let o = train(&w("a"), &["--dim", "32"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let weights = w("a/checkpoints/step-00000002/model.safetensors");
    let o = train(&w("b"), &["--dim", "32", "--init", &weights]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("init from {weights}: ")) && err.contains("missing (kept at their initialisation): 0 []"),
        "{err}"
    );
    let o = train(&w("c"), &["--dim", "48", "--init", &weights]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).trim().ends_with(&format!(
            "checkpoint {weights}: tensor 'blocks.0.attn.proj.bias' has shape [32], this model's \
             'blocks.0.attn.proj.bias' is [48]"
        )),
        "{}",
        text(&o.stderr)
    );
    assert!(!work.path().join("c/checkpoints/step-00000002").exists());
}

#[test]
fn pack_refuses_a_token_folder_of_no_samples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, 0);
    let out = dir.path().join("ds");
    let o = imglish(&[
        "pack",
        "--tokens",
        tokens.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "error: cannot pack {} into {}: {}: records no samples (every image was rejected at tokenize; see \
             rejects.parquet there): nothing to pack\n",
            tokens.display(),
            out.display(),
            tokens.join("tokenize.json").display()
        )
    );
    assert!(!out.join("index.json").exists());
}
