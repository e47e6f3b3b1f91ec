//! `imglish quickstart` end to end, at a small size: every stage runs, the artifacts are where the summary says,
//! the dataset verifies, a re-run into the same directory starts over cleanly, a foreign directory is refused.

use std::path::Path;
use std::process::{Command, Output};

fn imglish(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn imglish")
}

const SMALL: [&str; 14] = [
    "--images",
    "60",
    "--steps",
    "4",
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--batch-size",
    "16",
    "--out",
    "qs",
];

fn quickstart(dir: &Path) -> serde_json::Value {
    let mut args = vec!["--log-format", "json", "quickstart"];
    args.extend(SMALL);
    let out = imglish(dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("summary line");
    serde_json::from_str(last).expect("json summary")
}

#[test]
fn quickstart_runs_every_stage_and_reruns_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let v = quickstart(d);
    assert_eq!(v["event"], "quickstart");
    assert!(v["final_val_loss"].as_f64().expect("final") < v["initial_val_loss"].as_f64().expect("initial"));
    assert_eq!(v["probe"]["classes"], 6);
    assert!(v["probe"]["random_accuracy"].as_f64().is_some());
    for f in [
        "qs/demo/demo.json",
        "qs/manifest/samples.parquet",
        "qs/manifest/rejects.parquet",
        "qs/tokenizers/visual.onnx",
        "qs/tokenizers/text.json",
        "qs/tokens/tokenize.json",
        "qs/dataset/index.json",
        "qs/run/loss.png",
        "qs/run/metrics.jsonl",
        "qs/run/checkpoints/step-00000004/model.safetensors",
    ] {
        assert!(d.join(f).exists(), "{f} missing");
    }
    let verify = imglish(d, &["verify", "qs/dataset"]);
    assert_eq!(verify.status.code(), Some(0));

    // Again into the same directory: it starts over and gives the same validation losses.
    let again = quickstart(d);
    assert_eq!(again["initial_val_loss"], v["initial_val_loss"]);
    assert_eq!(again["final_val_loss"], v["final_val_loss"]);

    // A directory quickstart did not make is refused, untouched.
    std::fs::create_dir_all(d.join("mine")).expect("mkdir");
    std::fs::write(d.join("mine/keep.txt"), b"data").expect("write");
    let out = imglish(d, &["quickstart", "--out", "mine"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: mine is not empty and was not made by quickstart; choose a new --out directory"
    );
    assert!(d.join("mine/keep.txt").exists());
}

#[test]
fn quickstart_with_beit3_trains_every_task_and_runs_both_probes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut args = vec!["--log-format", "json", "quickstart", "--model", "beit3"];
    args.extend(SMALL);
    let out = imglish(d, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("summary")).expect("json");
    for task in ["image_mim", "text_mlm", "pair_mim", "pair_mlm"] {
        assert!(
            v["initial_val"]["tasks"][task]["loss"].as_f64().is_some(),
            "{task} missing: {v}"
        );
        assert!(
            v["final_val"]["tasks"][task]["loss"].as_f64().is_some(),
            "{task} missing: {v}"
        );
    }
    assert_eq!(v["probe"]["classes"], 6);
    let r = &v["retrieval"];
    assert!(r["val_pairs"].as_i64().expect("pairs") > 1);
    assert!(r["trained"]["i2t_r1"].as_f64().is_some() && r["random"]["t2i_r5"].as_f64().is_some());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("qs/run/checkpoints/step-00000004/state.json")).expect("state"))
            .expect("json");
    assert_eq!(state["architecture"], "beit3");

    // The retrieval probe on its own, and the settings the CLI refuses.
    let probe = imglish(
        d,
        &[
            "probe",
            "--task",
            "retrieval",
            "--checkpoint",
            "qs/run",
            "--dataset",
            "qs/dataset",
        ],
    );
    assert_eq!(
        probe.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(String::from_utf8_lossy(&probe.stdout).starts_with("retrieval probe: image->text R@1 "));
    // A checkpoint and a dataset that do not fit are refused before any compute, naming the mismatch.
    let mut other = vec!["quickstart", "--model", "beit3", "--codebook", "64"];
    other.extend(&SMALL[..SMALL.len() - 2]);
    other.extend(["--out", "qs64"]);
    let made = imglish(d, &other);
    assert_eq!(made.status.code(), Some(0), "{}", String::from_utf8_lossy(&made.stderr));
    for task in ["classify", "retrieval"] {
        let out = imglish(
            d,
            &[
                "probe",
                "--task",
                task,
                "--checkpoint",
                "qs/run",
                "--dataset",
                "qs64/dataset",
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            "error: probing qs/run/checkpoints/step-00000004 on qs64/dataset failed: dataset qs64/dataset: does not \
             fit checkpoint qs/run/checkpoints/step-00000004: visual vocabulary of 64, the model expects 1024"
        );
    }
    let bad_mix = imglish(
        d,
        &[
            "train",
            "--model",
            "beit3",
            "--dataset",
            "qs/dataset",
            "--out",
            "r2",
            "--mix",
            "image=0,text=0",
        ],
    );
    assert_eq!(bad_mix.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_mix.stderr).contains("at least one kind needs a positive weight"),
        "{}",
        String::from_utf8_lossy(&bad_mix.stderr)
    );
    let ranks = imglish(
        d,
        &[
            "train",
            "--model",
            "beit3",
            "--dataset",
            "qs/dataset",
            "--out",
            "r3",
            "--world-size",
            "2",
            "--steps",
            "1",
        ],
    );
    assert_eq!(ranks.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&ranks.stderr).trim(),
        "error: rank 0 of world size 2: `imglish train` trains in one process; for data-parallel training over \
         several processes or machines run `torchrun --nproc_per_node N -m imglish.pretrain --dataset qs/dataset \
         --out r3` (docs/guides.md, \"From one machine to a cluster\")"
    );
}
