//! End-to-end tests of the `imglish` binary: exit codes, the ONNX Runtime error, the demo corpus.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn imglish() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn imglish")
}

/// sha256 of every file under `root`, keyed by relative path.
fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
                let bytes = std::fs::read(&path).expect("read");
                out.insert(rel, format!("{:x}", Sha256::digest(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn missing_onnxruntime_is_a_one_line_error_naming_the_setup_script() {
    let out = run(imglish()
        .arg("doctor")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).expect("utf8");
    assert_eq!(
        stderr,
        "error: ONNX Runtime library not found at /nonexistent/libonnxruntime.so: run scripts/setup-onnxruntime \
         (or set ORT_DYLIB_PATH to an existing libonnxruntime.so)\n"
    );
}

#[test]
fn doctor_runs_the_onnxruntime_self_test() {
    let out = run(imglish().args(["--log-format", "json", "doctor"]));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["event"], "doctor");
    assert!(line["onnxruntime"].as_str().expect("path").contains("libonnxruntime"));
}

#[test]
fn usage_errors_exit_2() {
    let out = run(imglish().arg("--no-such-flag"));
    assert_eq!(out.status.code(), Some(2));
    let out = run(imglish().args(["--threads", "0", "doctor"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(imglish().args(["demo-corpus"]));
    assert_eq!(out.status.code(), Some(2), "--out is required");
}

#[test]
fn demo_corpus_is_byte_identical_for_a_seed_whatever_the_threads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    let gen = |dir: &Path, threads: &str, seed: &str| {
        let out = run(imglish()
            .args([
                "-q",
                "--threads",
                threads,
                "demo-corpus",
                "--images",
                "30",
                "--seed",
                seed,
                "--out",
            ])
            .arg(dir));
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty(), "--quiet prints nothing");
    };
    gen(&a, "1", "5");
    gen(&b, "2", "5");
    gen(&c, "2", "6");
    let (ha, hb, hc) = (tree_hashes(&a), tree_hashes(&b), tree_hashes(&c));
    assert_eq!(ha, hb);
    assert_ne!(ha, hc, "another seed gives other images");

    // The layout and the bad inputs are there.
    for f in [
        "demo.json",
        "captions/coco_captions.json",
        "captions/captions.jsonl",
        "captions/captions.tsv",
        "shards/demo-00000.tar",
        "images/circle/bad_empty.jpg",
        "images/square/bad_truncated.jpg",
        "images/triangle/bad_text.png",
        "images/cross/bad_huge.png",
    ] {
        assert!(ha.contains_key(f), "missing {f}");
    }
    assert_eq!(
        std::fs::metadata(a.join("images/circle/bad_empty.jpg"))
            .expect("meta")
            .len(),
        0
    );
    let huge = std::fs::read(a.join("images/cross/bad_huge.png")).expect("read");
    assert_eq!(
        &huge[16..24],
        &[0, 1, 0x86, 0xA0, 0, 1, 0x86, 0xA0],
        "IHDR claims 100000x100000"
    );
    let text = std::fs::read_to_string(a.join("images/triangle/bad_text.png")).expect("read");
    assert!(text.starts_with("this is a text file"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("demo.json")).expect("read")).expect("json");
    let reasons: Vec<&str> = summary["bad_inputs"]
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["reason"].as_str().expect("str"))
        .collect();
    for r in [
        "empty",
        "corrupt",
        "unsupported-format",
        "too-large",
        "missing-image",
        "duplicate",
    ] {
        assert!(reasons.contains(&r), "{r} missing from {reasons:?}");
    }
    let jsonl = std::fs::read_to_string(a.join("captions/captions.jsonl")).expect("read");
    assert!(
        jsonl.contains("\"image\":\"circle/demo_99998.jpg\""),
        "a caption row for a missing image"
    );

    // Re-running into a complete corpus with the same settings is a no-op; other settings are refused.
    gen(&a, "2", "5");
    assert_eq!(tree_hashes(&a), ha);
    let out = run(imglish()
        .args(["demo-corpus", "--images", "31", "--seed", "5", "--out"])
        .arg(&a));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

/// An ingest that accepts nothing fails (exit 1) and says why and how to fix it, unless --allow-empty.
#[test]
fn ingest_that_accepts_nothing_fails_with_the_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A folder of symbolic links into another tree (a subset made with `ln -s`).
    std::fs::create_dir_all(d.join("elsewhere")).expect("mkdir");
    std::fs::create_dir_all(d.join("subset")).expect("mkdir");
    for i in 0..3 {
        let target = d.join(format!("elsewhere/{i}.jpg"));
        std::fs::write(&target, b"not read").expect("write");
        std::os::unix::fs::symlink(&target, d.join(format!("subset/{i}.jpg"))).expect("symlink");
    }
    let out = run(imglish()
        .current_dir(d)
        .args(["ingest", "--images", "subset", "--out", "m"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim().lines().last().expect("a line"),
        "error: ingest accepted nothing: 3 seen, 3 rejected; most rejects: unsafe-path (3) (symbolic links that \
         lead out of the source folder are refused: pass --follow-symlinks to read them). The manifest in m is \
         empty; pass --allow-empty to accept that"
    );
    // With --follow-symlinks the links are read (a link to a real image is accepted).
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, 9, (y * 4) as u8]));
    img.save(d.join("elsewhere/real.png")).expect("png");
    std::os::unix::fs::symlink(d.join("elsewhere/real.png"), d.join("subset/real.png")).expect("symlink");
    let followed = run(imglish().current_dir(d).args([
        "--log-format",
        "json",
        "ingest",
        "--images",
        "subset",
        "--out",
        "mf",
        "--follow-symlinks",
    ]));
    assert_eq!(
        followed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    let warning: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&followed.stderr)
            .lines()
            .next()
            .expect("a warning"),
    )
    .expect("json");
    assert_eq!(warning["level"], "WARN");
    assert_eq!(
        warning["message"],
        "--follow-symlinks: files reached through symbolic links that leave the source folders are read; the \
         manifest records the link, so later stages (tokenize, finetune --images) read whatever the link points to \
         then: keep the targets in place and unchanged until the dataset is built"
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&followed.stdout).lines().last().expect("json")).expect("json");
    assert_eq!(summary["counts"]["accepted"], 1, "{summary}");
    assert_eq!(summary["counts"]["by_reason"]["unsupported-format"], 3, "{summary}");
    assert!(d.join("m/rejects.parquet").exists(), "the rejects are kept");
    let ok = run(imglish()
        .current_dir(d)
        .args(["ingest", "--images", "subset", "--out", "m2", "--allow-empty"]));
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    // The stage after an accepted empty manifest does not succeed on nothing.
    let empty =
        run(imglish()
            .current_dir(d)
            .args(["tokenize", "--manifest", "m2", "--tokenizer", "v.onnx", "--out", "t2"]));
    assert_eq!(empty.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&empty.stderr),
        "error: --manifest m2 holds no samples (its ingest accepted nothing of 4 items seen): nothing to tokenize\n"
    );

    // One source mostly rejected while the run as a whole looks fine: a warning names the source and the fix.
    std::fs::create_dir_all(d.join("good")).expect("mkdir");
    std::fs::create_dir_all(d.join("mixed")).expect("mkdir");
    for (i, dir) in ["good/a.png", "good/b.png", "mixed/c.png"].iter().enumerate() {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (i * 60) as u8, (y * 4) as u8])
        });
        img.save(d.join(dir)).expect("png");
    }
    for n in ["x", "y", "z"] {
        std::fs::write(d.join(format!("mixed/{n}.parquet")), b"PAR1").expect("write");
    }
    let warned = run(imglish()
        .current_dir(d)
        .args(["ingest", "--images", "good", "mixed", "--out", "m4"]));
    assert_eq!(
        warned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&warned.stderr)
    );
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(
        stderr.contains(
            "3 of 4 items of source mixed were rejected as unsupported-format (a folder source reads image files, \
             or the .tar shards of a folder that holds shards and no images; pass the .tar and .parquet files \
             found (mixed/x.parquet, mixed/y.parquet, mixed/z.parquet) to --images themselves)"
        ),
        "{stderr}"
    );
    // Warnings are plain text: no ANSI colour codes when stderr is not a terminal.
    assert!(stderr.contains(" WARN "), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");

    // Nothing accepted because of unsupported files: the hint says what to do.
    std::fs::create_dir_all(d.join("tables")).expect("mkdir");
    std::fs::write(d.join("tables/t.parquet"), b"PAR1").expect("write");
    let tables = run(imglish()
        .current_dir(d)
        .args(["ingest", "--images", "tables", "--out", "m5"]));
    assert_eq!(tables.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&tables.stderr)
            .trim()
            .lines()
            .last()
            .expect("a line"),
        "error: ingest accepted nothing: 1 seen, 1 rejected; most rejects: unsupported-format (1) (a folder source \
         reads image files, or the .tar shards of a folder that holds shards and no images; pass the .tar and \
         .parquet files found (tables/t.parquet) to --images themselves). The manifest in m5 is empty; pass \
         --allow-empty to accept that"
    );

    // One source, most of it rejected for one reason while something was accepted: the whole-run warning.
    std::fs::create_dir_all(d.join("most")).expect("mkdir");
    std::fs::copy(d.join("good/a.png"), d.join("most/a.png")).expect("copy");
    for n in ["x", "y", "z"] {
        std::fs::write(d.join(format!("most/{n}.tar")), b"not a tar").expect("write");
    }
    let most = run(imglish()
        .current_dir(d)
        .args(["ingest", "--images", "most", "--out", "m7"]));
    assert_eq!(most.status.code(), Some(0), "{}", String::from_utf8_lossy(&most.stderr));
    let stderr = String::from_utf8_lossy(&most.stderr);
    assert!(
        stderr.lines().any(|l| l.ends_with(
            " WARN 3 of 4 items were rejected as unsupported-format (a folder source reads image files, or the .tar \
             shards of a folder that holds shards and no images; pass the .tar and .parquet files found (most/x.tar, \
             most/y.tar, most/z.tar) to --images themselves)"
        )),
        "{stderr}"
    );

    // A JSONL text corpus whose lines lack --text-field: every line a bad-record, and the hint names the flag.
    std::fs::write(d.join("t.jsonl"), "{\"body\": \"a\"}\n{\"body\": \"b\"}\n").expect("write");
    let texts = run(imglish()
        .current_dir(d)
        .args(["ingest", "--texts", "t.jsonl", "--out", "m6"]));
    assert_eq!(texts.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&texts.stderr)
            .trim()
            .lines()
            .last()
            .expect("a line"),
        "error: ingest accepted nothing: 2 seen, 2 rejected; most rejects: bad-record (2) (check the field names: \
         --text-field, or the caption file's columns). The manifest in m6 is empty; pass --allow-empty to accept \
         that"
    );

    // --labels from-folders on a flat folder: no classes is an error.
    std::fs::create_dir_all(d.join("flat")).expect("mkdir");
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    img.save(d.join("flat/a.png")).expect("png");
    let out =
        run(imglish()
            .current_dir(d)
            .args(["ingest", "--images", "flat", "--out", "m3", "--labels", "from-folders"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .lines()
            .last()
            .expect("a line"),
        "error: --labels from-folders found no class folders: images must sit in SRC/CLASS/..., one folder per class"
    );
}

/// Ingest into a folder holding a manifest of other inputs is refused unless --overwrite; the same command again
/// redoes it; a folder of unrelated files is refused.
#[test]
fn ingest_refuses_a_folder_made_from_other_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (folder, shade) in [("a", 40u8), ("b", 200u8)] {
        std::fs::create_dir_all(d.join(folder)).expect("mkdir");
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([shade, (x * 4) as u8, (y * 4) as u8]));
        img.save(d.join(folder).join("x.png")).expect("png");
    }
    let ingest = |src: &str, extra: &[&str]| {
        let mut cmd = imglish();
        cmd.current_dir(d)
            .args(["ingest", "--images", src, "--out", "m"])
            .args(extra);
        run(&mut cmd)
    };
    assert_eq!(ingest("a", &[]).status.code(), Some(0));
    assert_eq!(
        ingest("a", &[]).status.code(),
        Some(0),
        "the same command again redoes it"
    );
    let out = ingest("b", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: m holds a manifest made from other inputs or settings (images differ); pass --overwrite to replace \
         it, or choose another --out"
    );
    let out = ingest("a", &["--seed", "7"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(seed differ)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ingest("b", &["--overwrite"]).status.code(), Some(0));

    std::fs::create_dir_all(d.join("mine")).expect("mkdir");
    std::fs::write(d.join("mine/notes.txt"), b"keep").expect("write");
    let mut cmd = imglish();
    let out = run(cmd.current_dir(d).args(["ingest", "--images", "a", "--out", "mine"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: mine is not empty (holds notes.txt) and holds no imglish manifest; choose another --out (or pass \
         --overwrite to write into it anyway)"
    );
    assert_eq!(std::fs::read(d.join("mine/notes.txt")).expect("kept"), b"keep");
}

/// Tokenize workers (`--worker I/N`) share their folder's lock: a single writer is refused while they run, and
/// they are refused while a single writer runs.
#[test]
fn tokenize_workers_share_the_folder_lock_and_exclude_a_single_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = d.join("tokens");
    std::fs::create_dir_all(&out).expect("mkdir");
    let busy = out.to_str().expect("utf8");
    let refused = |o: &std::process::Output, what: &str| {
        assert_eq!(o.status.code(), Some(1), "{what}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).trim(),
            format!(
                "error: another imglish process (pid {}) is writing {busy}; wait for it to finish or stop it",
                std::process::id()
            ),
            "{what}"
        );
    };
    let tokenize = |extra: &[&str]| {
        run(imglish()
            .current_dir(d)
            .args(["tokenize", "--manifest", "m", "--tokenizer", "t.onnx", "--out", busy])
            .args(extra))
    };
    // This process plays a running worker (a shared lock): a single writer is refused, another worker is not
    // (it goes on to fail on the missing manifest, past the lock).
    let worker = std::fs::File::open(&out).expect("open");
    worker.lock_shared().expect("lock");
    refused(&tokenize(&[]), "a single writer while a worker runs");
    let o = tokenize(&["--worker", "1/2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("another imglish process"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    worker.unlock().expect("unlock");
    // Now a single writer runs (an exclusive lock): a worker is refused.
    worker.lock().expect("lock");
    refused(&tokenize(&["--worker", "0/2"]), "a worker while a single writer runs");
}

/// Every stage that writes a folder refuses a second writer at once (pack's own test covers pack; the tokenizer
/// fits lock the folder their model goes into).
#[test]
fn ingest_tokenize_train_and_fits_refuse_a_folder_another_process_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = d.join("busy");
    std::fs::create_dir_all(&out).expect("mkdir");
    // This process plays the first writer: it holds the folder's lock as a running stage does.
    let held = std::fs::File::open(&out).expect("open");
    held.lock().expect("lock");
    let busy = out.to_str().expect("utf8");
    let (model, text) = (format!("{busy}/v.onnx"), format!("{busy}/t.json"));
    for args in [
        vec!["ingest", "--images", "nowhere", "--out", busy],
        vec!["tokenize", "--manifest", "m", "--tokenizer", "t.onnx", "--out", busy],
        vec!["train", "--dataset", "ds", "--out", busy],
        vec!["tokenizer", "fit", "--manifest", "m", "--out", &model],
        vec!["tokenizer", "fit-text", "--manifest", "m", "--out", &text],
    ] {
        let o = run(imglish().current_dir(d).args(&args));
        assert_eq!(o.status.code(), Some(1), "{}", args[0]);
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).trim(),
            format!(
                "error: another imglish process (pid {}) is writing {busy}; wait for it to finish or stop it",
                std::process::id()
            ),
            "{}",
            args[0]
        );
    }
}
