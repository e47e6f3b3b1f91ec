//! What a user meets when something is wrong: invalid values are usage errors (exit 2) named at parse time;
//! a missing file names its OS cause once; a stage pointed at another stage's folder says which stage made it;
//! a mistyped tokenizer path names the model.

use std::path::Path;
use std::process::{Command, Output};

fn imglish(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn imglish")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn invalid_values_are_usage_errors_at_parse_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let cases: [(&[&str], &str); 5] = [
        (
            &["train", "--dataset", "nowhere", "--out", "run", "--device", "mps"],
            "error: invalid value 'mps' for '--device <DEVICE>': unknown device 'mps' (cpu, cuda or cuda:N)",
        ),
        (
            &["train", "--dataset", "nowhere", "--out", "run", "--precision", "fp16"],
            "error: invalid value 'fp16' for '--precision <PRECISION>': unknown precision 'fp16' (f32 or bf16)",
        ),
        (
            &["train", "--dataset", "nowhere", "--out", "run", "--preset", "huge"],
            "error: invalid value 'huge' for '--preset <PRESET>': unknown preset 'huge' (one of: tiny, small, base, \
             large, beit3-tiny, beit3-small, beit3-base, beit3-large)",
        ),
        (
            &["ingest", "--images", "nowhere", "--out", "m", "--val-fraction", "1.5"],
            "error: invalid value '1.5' for '--val-fraction <F>': 1.5 is not in [0, 1]",
        ),
        (
            &[
                "tokenizer",
                "fit",
                "--manifest",
                "nowhere",
                "--out",
                "v.onnx",
                "--input-size",
                "100",
            ],
            "error: --input-size 100 must be a positive multiple of --patch 8",
        ),
    ];
    for (args, first_line) in cases {
        let o = imglish(d, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().next(), Some(first_line), "{args:?}");
    }
    assert!(!d.join("run").exists() && !d.join("m").exists(), "nothing was started");
}

#[test]
fn a_missing_file_names_its_os_cause_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    std::fs::create_dir(d.join("empty")).expect("mkdir");
    for args in [
        &["verify", "empty"][..],
        &["inspect", "empty"],
        &["train", "--dataset", "empty", "--out", "run"],
        &["pack", "--tokens", "empty", "--out", "ds"],
        &["ingest", "--images", "nowhere", "--out", "m"],
    ] {
        let o = imglish(d, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.matches("No such file or directory").count(), 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    let o = imglish(d, &["verify", "empty"]);
    assert_eq!(
        stderr(&o),
        "error: cannot open empty: empty/index.json: No such file or directory (os error 2)\n"
    );
}

#[test]
fn a_stage_pointed_at_another_stages_folder_names_both() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    // What each stage leaves in its folder (the markers are what is looked at).
    let touch = |rel: &str| {
        let p = d.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, "{}").expect("write");
    };
    touch("manifest/ingest.json");
    touch("tokens/tokenize.json");
    touch("dataset/index.json");
    touch("run/config.json");
    std::fs::create_dir_all(d.join("run/checkpoints")).expect("mkdir");
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "tokenize",
                "--manifest",
                "tokens",
                "--tokenizer",
                "v.onnx",
                "--out",
                "t2",
            ],
            "error: tokens looks like a token directory (the output of `imglish tokenize`); --manifest wants a \
             manifest directory (the output of `imglish ingest`)\n",
        ),
        (
            &["pack", "--tokens", "manifest", "--out", "ds"],
            "error: manifest looks like a manifest directory (the output of `imglish ingest`); --tokens wants a \
             token directory (the output of `imglish tokenize`)\n",
        ),
        (
            &["train", "--dataset", "tokens", "--out", "r2"],
            "error: tokens looks like a token directory (the output of `imglish tokenize`); --dataset wants a \
             dataset directory (the output of `imglish pack`)\n",
        ),
        (
            &["verify", "run"],
            "error: run looks like a training run directory (the output of `imglish train`); DATASET wants a \
             dataset directory (the output of `imglish pack`)\n",
        ),
        (
            &["tokenizer", "fit", "--manifest", "dataset", "--out", "v.onnx"],
            "error: dataset looks like a dataset directory (the output of `imglish pack`); --manifest wants a \
             manifest directory (the output of `imglish ingest`)\n",
        ),
        (
            &[
                "tokenize",
                "--manifest",
                "nothere",
                "--tokenizer",
                "v.onnx",
                "--out",
                "t2",
            ],
            "error: --manifest nothere: no such directory; --manifest wants a manifest directory (the output of \
             `imglish ingest`)\n",
        ),
    ];
    for (args, expected) in cases {
        let o = imglish(d, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&o), expected, "{args:?}");
    }
    for out in ["t2", "ds", "r2"] {
        let p = d.join(out);
        let empty = std::fs::read_dir(&p).map_or(true, |mut e| e.next().is_none());
        assert!(empty, "{out}: nothing written");
    }
}

#[test]
fn a_mistyped_tokenizer_path_names_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let o = imglish(d, &["-q", "demo-corpus", "--images", "12", "--out", "demo"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = imglish(
        d,
        &["-q", "ingest", "--images", "demo/images", "--out", "m", "--allow-empty"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = imglish(
        d,
        &[
            "-q",
            "tokenize",
            "--manifest",
            "m",
            "--tokenizer",
            "visuall.onnx",
            "--out",
            "t",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: cannot load the visual tokenizer visuall.onnx: visuall.onnx: No such file or directory (os error 2)\n"
    );
}

#[test]
fn captions_that_reach_no_image_are_a_loud_warning_naming_the_fields() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let o = imglish(d, &["-q", "demo-corpus", "--images", "12", "--out", "demo"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The same captions under field names imglish does not know.
    let good = std::fs::read_to_string(d.join("demo/captions/captions.jsonl")).expect("jsonl");
    let bad: String = good
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            format!(
                "{}\n",
                serde_json::json!({"file": v["image"], "sentences": v["captions"]})
            )
        })
        .collect();
    std::fs::write(d.join("bad.jsonl"), bad).expect("write");
    let o = imglish(
        d,
        &[
            "ingest",
            "--images",
            "demo/images",
            "--captions",
            "bad.jsonl",
            "--out",
            "m",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(" accepted images got a caption from --captions (")
            && err.contains("check the caption file's field names and image paths"),
        "{err}"
    );
    let o = imglish(
        d,
        &[
            "ingest",
            "--images",
            "demo/images",
            "--captions",
            "demo/captions/captions.jsonl",
            "--out",
            "m2",
        ],
    );
    assert!(!stderr(&o).contains("got a caption from --captions"), "{}", stderr(&o));
}

#[test]
fn tokenize_fails_when_every_image_is_gone_since_ingest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    std::fs::create_dir_all(d.join("imgs")).expect("mkdir");
    for i in 0..6u32 {
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([(x * 5) as u8, (i * 40) as u8, (y * 5) as u8])
        });
        img.save(d.join(format!("imgs/{i}.png"))).expect("png");
    }
    let ok = |o: Output| assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    ok(imglish(d, &["-q", "ingest", "--images", "imgs", "--out", "m"]));
    ok(imglish(
        d,
        &[
            "-q",
            "tokenizer",
            "fit",
            "--manifest",
            "m",
            "--patch",
            "8",
            "--input-size",
            "32",
            "--codebook",
            "4",
            "--out",
            "v.onnx",
        ],
    ));
    // The images move away after ingest (or a link's target does): every sample is rejected at tokenize.
    std::fs::rename(d.join("imgs"), d.join("moved")).expect("rename");
    let o = imglish(
        d,
        &["tokenize", "--manifest", "m", "--tokenizer", "v.onnx", "--out", "t"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: t: no sample was tokenized: 6 of 6 samples were rejected as unreadable (e.g. ")
            && last.ends_with("; see t/rejects.parquet"),
        "{err}"
    );
    assert!(!d.join("t/tokenize.json").exists(), "no completion marker");
    assert!(d.join("t/rejects.parquet").exists(), "the rejects are kept");
}

#[test]
fn fit_text_creates_the_folder_of_its_output() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let lines: Vec<String> = (0..60)
        .map(|i| format!("document {i} about shape {} and colour {}", i % 7, i % 5))
        .collect();
    std::fs::write(d.join("texts.txt"), lines.join("\n")).expect("write");
    let o = imglish(d, &["-q", "ingest", "--texts", "texts.txt", "--out", "m"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!d.join("new").exists());
    let o = imglish(
        d,
        &[
            "-q",
            "tokenizer",
            "fit-text",
            "--manifest",
            "m",
            "--vocab-size",
            "120",
            "--out",
            "new/dir/t.json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(d.join("new/dir/t.json").is_file());
}
