//! The pipeline through the real binary on a small demo corpus: ingest (thread-count independent), fitting the
//! tokenizers, tokenize (split across workers = one run), pack, verify.

use std::path::Path;
use std::process::Command;

/// Runs imglish in `dir` with extra environment variables, whatever its exit status.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("spawn")
}

/// The total of the first periodic progress line of `phase` in `err` (`PHASE: done/total (...)`).
fn progress_total(err: &str, phase: &str) -> u64 {
    let line = err
        .lines()
        .find(|l| l.starts_with(phase))
        .unwrap_or_else(|| panic!("no '{phase}' line: {err}"));
    let count = line[phase.len()..].split(' ').next().expect("count");
    let (_, total) = count.split_once('/').unwrap_or_else(|| panic!("no total: {line}"));
    total.parse().unwrap_or_else(|_| panic!("total of {line}"))
}

/// A progress line's count: `Some((done, total))`, or `None` for a count without a total.
type Count = Option<(u64, u64)>;

/// The off-terminal progress lines of `err`: each line after `progress: `, with its count when it has one
/// (`Some(Some((done, total)))`, or `Some(None)` for a count without a total) and `None` for a line that names a
/// phase and its time only.
fn progress_lines(err: &str) -> Vec<(String, Option<Count>)> {
    err.lines()
        .filter_map(|l| l.strip_prefix("progress: "))
        .map(|l| {
            let (head, _) = l.rsplit_once(" (").unwrap_or((l, ""));
            let count = head.rsplit_once(": ").map(|(_, c)| {
                c.split_once('/')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            });
            (l.to_string(), count)
        })
        .collect()
}

/// Runs imglish in `dir`; it must succeed.
fn imglish(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = run(dir, args, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn demo_corpus_to_verified_dataset() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    imglish(d, &["-q", "demo-corpus", "--images", "40", "--out", "demo"]);
    let ingest = |threads: &str, out: &str| {
        imglish(
            d,
            &[
                "-q",
                "--threads",
                threads,
                "ingest",
                "--images",
                "demo/images",
                "demo/shards/demo-00000.tar",
                "--captions",
                "demo/captions/coco_captions.json",
                "--labels",
                "from-folders",
                "--val-fraction",
                "0.25",
                "--out",
                out,
            ],
        )
    };
    ingest("1", "m1");
    ingest("2", "m2");
    for f in ["samples.parquet", "rejects.parquet", "classes.json"] {
        assert_eq!(
            std::fs::read(d.join("m1").join(f)).expect("m1"),
            std::fs::read(d.join("m2").join(f)).expect("m2"),
            "{f}"
        );
    }
    let out = imglish(
        d,
        &[
            "--log-format",
            "json",
            "tokenizer",
            "fit",
            "--manifest",
            "m1",
            "--patch",
            "8",
            "--input-size",
            "32",
            "--codebook",
            "32",
            "--iterations",
            "4",
            "--out",
            "tok/v.onnx",
        ],
    );
    let fit: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json line");
    assert!(fit["usage"].as_f64().expect("usage") > 0.3, "{fit}");
    imglish(
        d,
        &[
            "-q",
            "tokenizer",
            "fit-text",
            "--manifest",
            "m1",
            "--vocab-size",
            "300",
            "--out",
            "tok/t.json",
        ],
    );
    let tokenize = |extra: &[&str], out: &str| {
        let mut args = vec![
            "-q",
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--text-tokenizer",
            "tok/t.json",
            "--views",
            "2",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        imglish(d, &args);
    };
    tokenize(&["--part-samples", "16"], "tokens");
    tokenize(&["--part-samples", "16", "--worker", "1/2"], "split");
    assert!(
        !d.join("split/tokenize.json").exists(),
        "incomplete until worker 0 is done"
    );
    tokenize(&["--part-samples", "16", "--worker", "0/2"], "split");
    assert_eq!(files(&d.join("tokens")), files(&d.join("split")));
    assert!(
        !d.join("split/.worker-0.json").exists() && !d.join("split/.worker-1.json").exists(),
        "the workers' claims go once the run is complete"
    );

    // A token folder made with other settings is refused, not silently overwritten.
    let o = run(
        d,
        &[
            "-q",
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--text-tokenizer",
            "tok/t.json",
            "--views",
            "3",
            "--out",
            "tokens",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: tokens: holds tokens of another run (part-00000.done.json: another manifest, tokenizer, imglish \
         version or settings); pass --overwrite to replace them, or choose another --out\n"
    );

    // Workers of one folder started with other tokenizers: the second one fails at once, naming both.
    tokenize(&["--part-samples", "16", "--worker", "1/2"], "mixed");
    let o = run(
        d,
        &[
            "-q",
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--views",
            "2",
            "--part-samples",
            "16",
            "--worker",
            "0/2",
            "--out",
            "mixed",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: mixed: worker 1/2 of this folder was started with other tokenizers (--tokenizer tok/v.onnx \
         --text-tokenizer tok/t.json) than worker 0/2 (--tokenizer tok/v.onnx); start every worker with the same \
         flags (or delete mixed/.worker-1.json if that worker's run is abandoned)\n"
    );

    // The same two workers started at the same moment: whichever order their claims land in, neither waits for
    // ever nor finishes a mixed folder; each exits 1 naming the other's flags.
    let spawn = |worker: &str, text: bool| {
        let mut args = vec!["-q", "tokenize", "--manifest", "m1", "--tokenizer", "tok/v.onnx"];
        if text {
            args.extend(["--text-tokenizer", "tok/t.json"]);
        }
        args.extend([
            "--views",
            "2",
            "--part-samples",
            "16",
            "--worker",
            worker,
            "--out",
            "racing",
        ]);
        Command::new(env!("CARGO_BIN_EXE_imglish"))
            .current_dir(d)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (mut a, mut b) = (spawn("0/2", false), spawn("1/2", true));
    // A regression to waiting for ever fails here instead of hanging the test run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while [&mut a, &mut b]
        .iter_mut()
        .any(|c| c.try_wait().ok().flatten().is_none())
    {
        if std::time::Instant::now() > deadline {
            let _ = (a.kill(), b.kill());
            panic!("two racing tokenize workers still running after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A worker that finished its share before the other had claimed the folder exits 0 with its share done (a
    // worker's normal end: the run completes with the last worker); the other one then meets its claim. So at
    // least one exits 1 naming the other's flags, any other exits 0, and no tokenize.json is ever written.
    let mut refused = 0;
    for o in [
        a.wait_with_output().expect("worker 0"),
        b.wait_with_output().expect("worker 1"),
    ] {
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() == Some(0) {
            continue;
        }
        refused += 1;
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with("error: racing: worker ")
                && err.contains(" of this folder was started with other tokenizers (--tokenizer tok/v.onnx")
                && err.contains("start every worker with the same flags"),
            "{err}"
        );
    }
    assert!(refused >= 1, "neither racing worker was refused");
    assert!(!d.join("racing/tokenize.json").exists());

    // Progress when stderr is not a terminal: periodic lines with the phase and its total.
    let o = run(
        d,
        &[
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--text-tokenizer",
            "tok/t.json",
            "--views",
            "2",
            "--out",
            "progress",
        ],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(progress_total(&err, "progress: tokenizing images: ") > 0);
    assert!(
        !err.contains('\x1b'),
        "no ANSI codes when stderr is not a terminal: {err}"
    );

    // The other long stages too: ingest per source with its item count, tokenizer fit by named phases with
    // totals (reading training patches of N images, Lloyd iterations i/n), and JSON records with --log-format json.
    let o = run(
        d,
        &["ingest", "--images", "demo/images", "--out", "m-progress"],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(progress_total(&err, "progress: ingesting demo/images: ") > 0, "{err}");
    let o = run(
        d,
        &[
            "tokenizer",
            "fit",
            "--manifest",
            "m1",
            "--patch",
            "8",
            "--input-size",
            "32",
            "--codebook",
            "16",
            "--iterations",
            "3",
            "--out",
            "progress-fit/v.onnx",
        ],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(progress_total(&err, "progress: reading training patches (images): ") > 0);
    // Every phase announces itself as it starts, however short (later counts depend on timing).
    assert!(err.contains("\nprogress: Lloyd iterations: 0/3 ("), "{err}");
    // Before its first counted phase the fit names what it does, with no bare count ("reading patches: 0").
    for (line, count) in progress_lines(&err) {
        match count {
            Some(count) => assert!(count.is_some(), "a count without its total: {line}"),
            None => assert!(line.ends_with("s elapsed)"), "{line}"),
        }
    }
    assert!(!err.contains("progress: reading patches: 0"), "{err}");
    // The summary says how many held-out patches the code usage was measured on.
    let text = String::from_utf8_lossy(&o.stdout);
    let held = text
        .lines()
        .find(|l| l.trim_start().starts_with("held-out: "))
        .unwrap_or_else(|| panic!("no held-out line: {text}"));
    assert!(
        held.contains(" patches of ") && held.contains(" images, codes used "),
        "{held}"
    );
    // Fewer held-out patches than 4 per code (16 codes here): the line says the usage under-counts.
    let patches: u64 = held
        .trim_start()
        .strip_prefix("held-out: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("held-out patch count: {held}"));
    assert_eq!(
        held.contains(" (too few patches to see every code)"),
        patches < 4 * 16,
        "{held}"
    );
    let o = run(
        d,
        &[
            "--log-format",
            "json",
            "ingest",
            "--images",
            "demo/images",
            "--out",
            "m-progress-json",
        ],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(o.status.code(), Some(0));
    let record: serde_json::Value = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["progress"] == "ingesting demo/images")
        .expect("a JSON progress record");
    assert!(record["len"].as_u64().expect("len") > 0, "{record}");
    assert!(record["pos"].is_u64() && record["elapsed_s"].is_f64(), "{record}");

    // From another directory: the manifest's relative source paths are found through its base directory.
    let elsewhere = tempfile::tempdir().expect("tmp");
    let abs = |p: &str| d.join(p).display().to_string();
    imglish(
        elsewhere.path(),
        &[
            "-q",
            "tokenize",
            "--manifest",
            &abs("m1"),
            "--tokenizer",
            &abs("tok/v.onnx"),
            "--text-tokenizer",
            &abs("tok/t.json"),
            "--views",
            "2",
            "--part-samples",
            "16",
            "--out",
            &abs("moved"),
        ],
    );
    assert_eq!(files(&d.join("tokens")), files(&d.join("moved")));

    // Killed at some point during a run (wherever that falls), then re-run: the same bytes as a clean run.
    let mut child = Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(d)
        .args([
            "-q",
            "--threads",
            "1",
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--text-tokenizer",
            "tok/t.json",
            "--views",
            "2",
            "--part-samples",
            "4",
            "--out",
            "killed",
        ])
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(150));
    let _ = child.kill();
    let _ = child.wait();
    tokenize(&["--part-samples", "4"], "killed");
    tokenize(&["--part-samples", "4"], "clean");
    assert_eq!(files(&d.join("killed")), files(&d.join("clean")));

    imglish(
        d,
        &[
            "-q",
            "pack",
            "--tokens",
            "tokens",
            "--manifest",
            "m1",
            "--out",
            "dataset",
            "--shuffle-seed",
            "3",
        ],
    );
    let out = run(
        d,
        &["--log-format", "json", "verify", "dataset"],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(out.status.code(), Some(0));
    // verify shows its shards as a phase with their total.
    let shards = std::fs::read_to_string(d.join("dataset/index.json")).expect("index");
    let shards = serde_json::from_str::<serde_json::Value>(&shards).expect("json")["shards"]
        .as_array()
        .map_or(0, Vec::len) as u64;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["progress"] == "verifying shards" && v["len"] == shards),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json line");
    let m1 = std::fs::read_to_string(d.join("m1/ingest.json")).expect("ingest.json");
    let accepted = serde_json::from_str::<serde_json::Value>(&m1).expect("json")["counts"]["accepted"].as_u64();
    assert_eq!(v["ok"], true);
    assert_eq!(
        Some(v["train"].as_u64().expect("train") + v["val"].as_u64().expect("val")),
        accepted
    );

    // A device this build cannot use: exit 1 with a clear message.
    let out = Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(d)
        .args([
            "tokenize",
            "--manifest",
            "m1",
            "--tokenizer",
            "tok/v.onnx",
            "--out",
            "x",
            "--device",
            "cuda",
        ])
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device cuda:0: "), "{err}");

    // Stage 4 on the same dataset: a small model for a few steps, with checkpoints, then the probe.
    let train = [
        "--log-format",
        "json",
        "train",
        "--dataset",
        "dataset",
        "--out",
        "run",
        "--preset",
        "tiny",
        "--dim",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "3",
    ];
    let out = imglish(d, &train);
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let summary: serde_json::Value = serde_json::from_str(&last).expect("train summary json");
    assert_eq!(summary["event"], "train");
    assert_eq!(summary["steps"], 6);
    assert!(
        summary["final_val"]["loss"].as_f64().expect("val loss")
            < summary["initial_val_loss"].as_f64().expect("initial")
    );
    // In text mode each evaluation prints the majority-code baseline next to the masked-token accuracy; off a
    // terminal the periodic progress lines count the steps done (a Slurm log is never silent while it trains).
    let out = run(
        d,
        &[
            "train",
            "--dataset",
            "dataset",
            "--out",
            "run-text",
            "--preset",
            "tiny",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--steps",
            "4",
            "--batch-size",
            "8",
        ],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress_lines(&err)
            .iter()
            .any(|(_, c)| matches!(c, Some(Some((done, 4))) if *done >= 1)),
        "no periodic line with steps done: {err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let val = text
        .lines()
        .find(|l| l.trim_start().starts_with("step ") && l.contains(" val loss "))
        .unwrap_or_else(|| panic!("no val line: {text}"));
    assert!(
        val.contains(" val acc ") && val.contains(" (always the most frequent code: ") && val.ends_with(" samples)"),
        "{val}"
    );
    // The baseline printed is the one in metrics.jsonl, and a real share of the masked codes.
    let printed = val
        .split("(always the most frequent code: ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("baseline");
    let metrics = std::fs::read_to_string(d.join("run-text/metrics.jsonl")).expect("metrics");
    let majority = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "val")
        .and_then(|v| v["majority_accuracy"].as_f64())
        .expect("majority_accuracy");
    assert!(majority > 0.0 && majority <= 1.0, "{majority}");
    assert_eq!(printed, format!("{majority:.3}"));
    for f in [
        "run/metrics.jsonl",
        "run/loss.png",
        "run/config.json",
        "run/checkpoints/step-00000006/model.safetensors",
    ] {
        assert!(d.join(f).exists(), "{f}");
    }
    let out = run(
        d,
        &[
            "--log-format",
            "json",
            "probe",
            "--checkpoint",
            "run",
            "--dataset",
            "dataset",
            "--iterations",
            "50",
        ],
        &[("IMGLISH_PROGRESS_SECS", "0.001")],
    );
    assert_eq!(out.status.code(), Some(0));
    // Named phases with their totals in the periodic progress records (stderr is not a terminal here).
    let phases: Vec<(String, u64)> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["progress"].as_str()?.to_string(), v["len"].as_u64().unwrap_or(0))))
        .collect();
    for which in ["trained", "random"] {
        let fit = format!("fitting the classifier on the {which} encoder's features (iterations)");
        assert!(phases.iter().any(|(p, len)| *p == fit && *len == 50), "{phases:?}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe json");
    assert_eq!(v["event"], "probe");
    assert_eq!(v["classes"], 6);
    assert!(v["accuracy"].as_f64().is_some() && v["random_accuracy"].as_f64().is_some());

    // Training on a GPU that is not there: exit 1 with a clear message, before any work.
    let out = Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(d)
        .args(["train", "--dataset", "dataset", "--out", "gpu-run", "--device", "cuda"])
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device cuda:0: CUDA is not available (libtorch sees no CUDA device"),
        "{err}"
    );
    assert!(!d.join("gpu-run/checkpoints").exists());

    // inspect: the class histogram with names, a sample found by its file name, captions decoded, tokens as a
    // grid.
    // (the first circle image ingest accepted: the corpus's duplicates and bad files are rejected)
    let mut keys: Vec<String> = std::fs::read_dir(d.join("demo/images/circle"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("demo_"))
        .collect();
    keys.sort();
    let (key, out) = keys
        .iter()
        .find_map(|key| {
            let out = run(
                d,
                &[
                    "inspect",
                    "dataset",
                    "--manifest",
                    "m1",
                    "--key",
                    key,
                    "--text-tokenizer",
                    "tok/t.json",
                ],
                &[],
            );
            out.status.success().then(|| (key.clone(), out))
        })
        .expect("an accepted circle");
    // A key no sample has: exit 1, naming the manifest and the key.
    let missing = run(
        d,
        &["inspect", "dataset", "--manifest", "m1", "--key", "no/such.png"],
        &[],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "error: no sample of m1 has the key no/such.png\n"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let classes = text
        .lines()
        .find(|l| l.trim_start().starts_with("classes"))
        .expect("classes line");
    assert!(classes.contains("(0 circle: "), "{classes}");
    let header = format!(" (circle/{key} in demo/images): split ");
    assert!(
        text.lines()
            .any(|l| l.starts_with("sample ") && l.contains(&header) && l.contains("label 0 circle")),
        "{text}"
    );
    assert!(text.contains("\n  caption 0: \"") && text.contains("circle"), "{text}");
    assert!(
        text.contains("  view 0: crop ") && text.contains(", tokens (4x4):\n      "),
        "{text}"
    );
}
