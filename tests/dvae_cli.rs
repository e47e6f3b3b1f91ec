//! `imglish tokenizer train-dvae` and `imglish tokenizer eval` as processes: a tiny dVAE trains on demo images,
//! its exported encoder gives libtorch's tokens (the parity the command checks, and the card records), its decoder
//! reproduces the trainer's held-out PSNR through ONNX Runtime, an interrupted run resumes to identical weights,
//! the tokenizer tokenizes, and misuse is one line with exit 1.

use std::path::Path;
use std::process::{Command, Output};

fn imglish(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run imglish")
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim().lines().last().expect("a line")).expect("json")
}

/// A small dVAE: 32 px in, 4x4 grid, 64 codes, width 8.
const TINY: [&str; 14] = [
    "--codebook",
    "64",
    "--input-size",
    "32",
    "--grid",
    "4",
    "--width",
    "8",
    "--batch-size",
    "4",
    "--eval-images",
    "6",
    "--warmup-steps",
    "1",
];

fn manifest(d: &Path) {
    ok(&imglish(d, &["-q", "demo-corpus", "--images", "40", "--out", "demo"]));
    ok(&imglish(
        d,
        &[
            "-q",
            "ingest",
            "--images",
            "demo/images",
            "--val-fraction",
            "0.2",
            "--out",
            "m",
        ],
    ));
}

fn train(d: &Path, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "--log-format",
        "json",
        "tokenizer",
        "train-dvae",
        "--manifest",
        "m",
        "--out",
        out,
    ];
    args.extend(TINY);
    // One thread: resume is compared bit for bit (README, "Train and probe").
    args.extend(["--steps", "6", "--checkpoint-every", "3", "--eval-every", "3"]);
    args.extend(["--threads", "1"]);
    args.extend(extra);
    imglish(d, &args)
}

#[test]
fn train_dvae_exports_a_tokenizer_equal_to_libtorch_and_resumes_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    manifest(d);

    let summary = last_json(&ok(&train(d, "tok/dvae.onnx", &[])));
    assert_eq!(summary["event"], "train-dvae");
    assert_eq!(summary["steps"], 6);
    // The exported encoder's tokens equal libtorch's argmax on every held-out code (6 images x 16 cells).
    assert_eq!(summary["parity"]["codes"], 96);
    assert_eq!(summary["parity"]["equal"], 96);
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("tok/dvae.card.json")).expect("card")).expect("json");
    assert_eq!(card["grid"], serde_json::json!([4, 4]));
    assert_eq!(card["vocab_size"], 64);
    assert_eq!(card["decoder"]["file"], "dvae.decoder.onnx");
    assert_eq!(card["stats"]["parity"]["fraction"], 1.0);
    assert!(d.join("tok/dvae.decoder.onnx").exists());
    assert!(d.join("tok/dvae.run/loss.png").exists());

    // ONNX Runtime's encoder + decoder reproduce the trainer's last held-out PSNR (libtorch, hard codes).
    let eval = last_json(&ok(&imglish(
        d,
        &[
            "--log-format",
            "json",
            "tokenizer",
            "eval",
            "--tokenizer",
            "tok/dvae.onnx",
            "--manifest",
            "m",
            "--images",
            "6",
        ],
    )));
    let trained = summary["last"]["psnr"].as_f64().expect("psnr");
    let measured = eval["psnr"].as_f64().expect("psnr");
    assert!(
        (trained - measured).abs() < 1e-3,
        "libtorch {trained} dB, ONNX Runtime {measured} dB"
    );
    assert_eq!(eval["images"], 6);

    // The tokenizer tokenizes.
    ok(&imglish(
        d,
        &[
            "-q",
            "tokenize",
            "--manifest",
            "m",
            "--tokenizer",
            "tok/dvae.onnx",
            "--views",
            "1",
            "--out",
            "t",
        ],
    ));

    // `inspect --png --tokenizer` draws the decoder's reconstruction of each view under its tokens.
    ok(&imglish(d, &["-q", "pack", "--tokens", "t", "--out", "ds"]));
    let inspect = |tokenizer: &str| {
        imglish(
            d,
            &[
                "--log-format",
                "json",
                "inspect",
                "ds",
                "--manifest",
                "m",
                "--key",
                "demo_00000.jpg",
                "--png",
                "s.png",
                "--tokenizer",
                tokenizer,
            ],
        )
    };
    let drawn = last_json(&ok(&inspect("tok/dvae.onnx")));
    assert_eq!(drawn["png_reconstructions"], true);
    let sheet = image::open(d.join("s.png")).expect("png");
    assert_eq!(sheet.height(), 8 + 2 * (224 + 8), "token row and reconstruction row");
    ok(&imglish(
        d,
        &[
            "-q",
            "tokenizer",
            "fit",
            "--manifest",
            "m",
            "--out",
            "km.onnx",
            "--codebook",
            "16",
            "--input-size",
            "32",
        ],
    ));
    let o = inspect("km.onnx");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("--tokenizer km.onnx is not the tokenizer the dataset was made with"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Stopped after step 3 and resumed: the same weights, byte for byte, and the same exported encoder.
    let stopped = last_json(&ok(&train(d, "tok2/dvae.onnx", &["--stop-at", "3"])));
    assert_eq!(stopped["stopped_at"], 3);
    assert!(!d.join("tok2/dvae.onnx").exists(), "a stopped run exports nothing");
    ok(&train(d, "tok2/dvae.onnx", &["--resume"]));
    let weights = |p: &str| std::fs::read(d.join(p).join("checkpoints/step-00000006/model.safetensors")).expect("w");
    assert_eq!(weights("tok/dvae.run"), weights("tok2/dvae.run"));
    assert_eq!(
        std::fs::read(d.join("tok/dvae.onnx")).expect("onnx"),
        std::fs::read(d.join("tok2/dvae.onnx")).expect("onnx")
    );

    // A finished run resumed again (say, after a crash while exporting) exports from its last checkpoint.
    std::fs::remove_file(d.join("tok2/dvae.onnx")).expect("rm");
    let again = last_json(&ok(&train(d, "tok2/dvae.onnx", &["--resume"])));
    assert_eq!(again["steps_this_run"], 0);
    assert_eq!(
        std::fs::read(d.join("tok/dvae.onnx")).expect("onnx"),
        std::fs::read(d.join("tok2/dvae.onnx")).expect("onnx")
    );

    // Resuming with other settings is refused, naming the setting.
    let o = train(d, "tok2/dvae.onnx", &["--resume", "--kl-weight", "0.1"]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("written by a run with other settings: kl_weight: checkpoint 0.0005, now 0.1"),
        "{stderr}"
    );
}

#[test]
fn the_vq_quantizer_exports_a_tokenizer_equal_to_libtorch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    manifest(d);
    let summary = last_json(&ok(&train(d, "vq/dvae.onnx", &["--quantizer", "vq", "--vq-dim", "8"])));
    let parity = &summary["parity"];
    assert_eq!(parity["codes"], 96);
    assert!(parity["fraction"].as_f64().expect("fraction") >= 0.999, "{parity}");
    assert!(
        parity["max_margin_of_differences"].as_f64().expect("margin") <= 1e-4,
        "{parity}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("vq/dvae.card.json")).expect("card")).expect("json");
    assert_eq!(
        card["stats"]["config"]["model"]["quantizer"],
        serde_json::json!({"kind": "vq", "dim": 8})
    );
    let eval = last_json(&ok(&imglish(
        d,
        &[
            "--log-format",
            "json",
            "tokenizer",
            "eval",
            "--tokenizer",
            "vq/dvae.onnx",
            "--manifest",
            "m",
            "--images",
            "6",
        ],
    )));
    let trained = summary["last"]["psnr"].as_f64().expect("psnr");
    let measured = eval["psnr"].as_f64().expect("psnr");
    assert!(
        (trained - measured).abs() < 1e-3,
        "libtorch {trained} dB, ONNX Runtime {measured} dB"
    );

    // `quickstart --tokenizer` runs the demo with it instead of fitting a codebook.
    let q = last_json(&ok(&imglish(
        d,
        &[
            "--log-format",
            "json",
            "quickstart",
            "--images",
            "60",
            "--steps",
            "2",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--batch-size",
            "8",
            "--tokenizer",
            "vq/dvae.onnx",
            "--out",
            "qs",
        ],
    )));
    assert_eq!(q["event"], "quickstart");
    assert!(!d.join("qs/tokenizers/visual.onnx").exists(), "no codebook was fitted");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("qs/dataset/index.json")).expect("index")).expect("json");
    assert_eq!(index["tokenizer"]["card"]["name"], "dvae");
    assert_eq!(index["tokenizer"]["grid"], serde_json::json!([4, 4]));
}

#[test]
fn kmeans_rgb_codebooks_have_a_decoder_and_others_are_measured_without() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    manifest(d);
    for (features, name) in [("rgb", "rgb"), ("structure", "st")] {
        ok(&imglish(
            d,
            &[
                "-q",
                "tokenizer",
                "fit",
                "--manifest",
                "m",
                "--out",
                &format!("{name}.onnx"),
                "--codebook",
                "16",
                "--patch",
                "8",
                "--input-size",
                "32",
                "--features",
                features,
            ],
        ));
    }
    assert!(d.join("rgb.decoder.onnx").exists());
    assert!(!d.join("st.decoder.onnx").exists());
    let rgb = last_json(&ok(&imglish(
        d,
        &[
            "--log-format",
            "json",
            "tokenizer",
            "eval",
            "--tokenizer",
            "rgb.onnx",
            "--manifest",
            "m",
        ],
    )));
    let psnr = rgb["psnr"].as_f64().expect("a PSNR");
    // 16 colour patches of 8x8 describe the demo's flat shapes roughly: far above noise, far below lossless.
    assert!((10.0..40.0).contains(&psnr), "{psnr}");
    let st = ok(&imglish(
        d,
        &["tokenizer", "eval", "--tokenizer", "st.onnx", "--manifest", "m"],
    ));
    assert!(st.contains("reconstruction - (the tokenizer has no decoder)"), "{st}");
}

#[test]
fn train_dvae_misuse_is_one_line_and_exit_1() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    manifest(d);
    let o = imglish(
        d,
        &[
            "--log-format",
            "json",
            "tokenizer",
            "train-dvae",
            "--manifest",
            "m",
            "--out",
            "tok/dvae.onnx",
            "--input-size",
            "32",
            "--grid",
            "5",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "{\"error\":\"training the dVAE on m failed: invalid configuration: --input-size 32 must be a multiple of --grid \
         5\",\"level\":\"ERROR\"}\n"
    );
    let o = train(d, "tok/dvae.bin", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("--out tok/dvae.bin must name an .onnx file (the encoder; its card and decoder go beside it)"));
    // A folder that is not an ingest output (here the demo corpus itself).
    let o = imglish(d, &["tokenizer", "train-dvae", "--manifest", "demo", "--out", "x.onnx"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: training the dVAE on demo failed: dataset demo: not an ingest manifest: demo/ingest.json: No such \
         file or directory (os error 2)\n"
    );
}
