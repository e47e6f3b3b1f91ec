//! `imglish finetune` as a process: a run evaluates, keeps its best weights and resumes exactly; BEiT-3
//! checkpoints fine-tune too; every misfit between checkpoint, dataset and flags is one line and exit 1 (2 for
//! usage errors) before any step.

use std::path::Path;

mod common;

use common::{imglish, text, write_tokens_with};

struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        Work {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).to_str().expect("utf8").to_string()
    }

    /// Packs `n` samples of token directory `name` into dataset `name-ds`.
    fn dataset(&self, name: &str, n: u64, labelled: bool, vocab_size: u32) -> String {
        self.dataset_of(name, n, labelled, vocab_size, "ab")
    }

    /// [`Work::dataset`] tokenized by the tokenizer of fingerprint `fingerprint` (repeated).
    fn dataset_of(&self, name: &str, n: u64, labelled: bool, vocab_size: u32, fingerprint: &str) -> String {
        write_tokens_with(&self.dir.path().join(name), n, labelled, vocab_size, fingerprint);
        let ds = self.path(&format!("{name}-ds"));
        let o = imglish(&["-q", "pack", "--tokens", &self.path(name), "--out", &ds]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        ds
    }

    /// A 2-step pretraining run of a small model.
    fn pretrain(&self, ds: &str, out: &str, extra: &[&str]) -> String {
        let out = self.path(out);
        let mut args = vec![
            "-q",
            "train",
            "--dataset",
            ds,
            "--out",
            &out,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--dim",
            "32",
            "--depth",
            "2",
            "--heads",
            "2",
        ];
        args.extend_from_slice(extra);
        let o = imglish(&args);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        out
    }
}

/// `imglish finetune` with small defaults; a flag in `extra` replaces the default of that flag.
fn finetune(ckpt: &str, ds: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let defaults = [
        ("--steps", "6"),
        ("--batch-size", "4"),
        ("--eval-every", "2"),
        ("--log-every", "2"),
        ("--lr", "1e-2"),
        ("--cutmix", "1.0"),
        // One thread: the resume tests compare weights bit for bit, which more threads on a loaded machine do
        // not promise (README, "Train and probe").
        ("--threads", "1"),
    ];
    let mut args = vec!["finetune", "--checkpoint", ckpt, "--dataset", ds, "--out", out];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    imglish(&args)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn finetune_keeps_the_best_and_resumes_exactly() {
    let w = Work::new();
    let ds = w.dataset("tokens", 60, true, 512);
    let run = w.pretrain(&ds, "pre", &[]);

    let whole = w.path("whole");
    let o = finetune(&run, &ds, &whole, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    // Shared relative position table of pretraining → one per block; the MIM head and final norm unused.
    assert!(
        err.contains("2 per-layer relative position tables from the shared one")
            && err.contains("missing (kept at their initialisation): 0 []")
            && err.contains("lm_head.weight"),
        "{err}"
    );
    assert!(err.contains("(5 classes)"), "{err}");
    let metrics = String::from_utf8(read(&Path::new(&whole).join("metrics.jsonl"))).expect("utf8");
    let vals: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|v: &serde_json::Value| v["kind"] == "val")
        .collect();
    assert_eq!(
        vals.iter()
            .map(|v| v["step"].as_u64().expect("step"))
            .collect::<Vec<_>>(),
        [0, 2, 4, 6]
    );
    let best_top1 = vals
        .iter()
        .map(|v| v["top1"].as_f64().expect("top1"))
        .fold(0.0, f64::max);
    let best: serde_json::Value =
        serde_json::from_slice(&read(&Path::new(&whole).join("best/best.json"))).expect("best.json");
    assert_eq!(best["top1"].as_f64(), Some(best_top1));
    assert!(vals
        .iter()
        .all(|v| v["top5"].as_f64().expect("top5") >= v["top1"].as_f64().expect("top1")));
    assert!(Path::new(&whole).join("best/model.safetensors").exists());
    assert!(Path::new(&whole).join("loss.png").exists());

    // 3 steps, then --resume to 6: the same weights, metrics and best.
    let split = w.path("split");
    let o = finetune(&run, &ds, &split, &["--stop-at", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = finetune(&run, &ds, &split, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("already holds checkpoints: pass --resume"),
        "{}",
        text(&o.stderr)
    );
    let o = finetune(&run, &ds, &split, &["--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let last = "checkpoints/step-00000006/model.safetensors";
    assert!(
        read(&Path::new(&whole).join(last)) == read(&Path::new(&split).join(last)),
        "weights differ"
    );
    // The evaluations are the same (a stopped run logs a partial train interval at its stop, so train lines
    // differ there).
    let vals = |m: String| -> Vec<String> {
        m.lines()
            .filter(|l| l.contains("\"kind\":\"val\""))
            .map(String::from)
            .collect()
    };
    let resumed = String::from_utf8(read(&Path::new(&split).join("metrics.jsonl"))).expect("utf8");
    let whole_vals = vals(metrics);
    assert_eq!(whole_vals.len(), 4);
    assert_eq!(whole_vals, vals(resumed));
    assert_eq!(
        read(&Path::new(&whole).join("best/best.json")),
        read(&Path::new(&split).join("best/best.json"))
    );

    // Another setting on resume is refused naming it.
    let o = finetune(
        &run,
        &ds,
        &split,
        &["--resume", "--steps", "8", "--label-smoothing", "0.2"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("label_smoothing: checkpoint 0.1, now 0.2") && err.contains("steps: checkpoint 6, now 8"),
        "{err}"
    );

    // The random-init baseline: same run, other start.
    let o = finetune(&run, &ds, &w.path("random"), &["--random-init"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("random initialisation (--random-init)"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn finetune_a_beit3_checkpoint() {
    let w = Work::new();
    let ds = w.dataset("tokens", 40, true, 512);
    let run = w.pretrain(&ds, "pre3", &["--model", "beit3", "--preset", "beit3-tiny"]);
    let out = w.path("ft3");
    let o = finetune(&run, &ds, &out, &["--steps", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("mim_head.weight") && err.contains("missing (kept at their initialisation): 0 []"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&read(&Path::new(&out).join("checkpoints/step-00000002/state.json"))).expect("state");
    assert_eq!(state["architecture"], "beit3-classifier");
}

#[test]
fn finetune_refuses_misfits_before_any_step() {
    let w = Work::new();
    let ds = w.dataset("tokens", 40, true, 512);
    let run = w.pretrain(&ds, "pre", &[]);
    let ckpt = format!("{run}/checkpoints/step-00000002");
    let last_line = |o: &std::process::Output| text(&o.stderr).trim().lines().last().unwrap_or("").to_string();

    // No labels.
    let bare = w.dataset("bare", 40, false, 512);
    let out = w.path("x1");
    let o = finetune(&run, &bare, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: dataset {bare}: no sample has a label: fine-tuning a classifier needs labels (ingest with \
             --labels from-folders)"
        )
    );
    assert!(!Path::new(&out).join("checkpoints").exists());

    // Another visual vocabulary.
    let other = w.dataset("other", 40, true, 256);
    let o = finetune(&run, &other, &w.path("x2"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: dataset {other}: does not fit checkpoint {ckpt}: visual vocabulary of 256, the model expects 512"
        )
    );

    // Same grid and vocabulary, another tokenizer: the codes mean other things.
    let retokenized = w.dataset_of("retok", 40, true, 512, "cd");
    let o = finetune(&run, &retokenized, &w.path("x6"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: dataset {retokenized}: does not fit checkpoint {ckpt}: tokens of visual tokenizer cdcdcdcdcdcd, \
             the checkpoint was trained on tokens of abababababab (same grid and vocabulary, other codes: \
             re-tokenize with the checkpoint's tokenizer)"
        )
    );
    let o = imglish(&["probe", "--checkpoint", &run, "--dataset", &retokenized]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        last_line(&o).contains("tokens of visual tokenizer cdcdcdcdcdcd"),
        "{}",
        text(&o.stderr)
    );

    // Mixup cannot average token ids.
    let o = finetune(&run, &ds, &w.path("x3"), &["--mixup", "0.8"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        "error: invalid configuration: --mixup needs a pixel-input encoder (token ids cannot be averaged); use \
         --cutmix, which swaps whole patches"
    );

    // A fine-tuned checkpoint is not a pretraining one.
    let ft = w.path("ft");
    let o = finetune(&run, &ds, &ft, &["--steps", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = finetune(&ft, &ds, &w.path("x4"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: checkpoint {ft}/checkpoints/step-00000001: holds a beit-classifier model; fine-tuning starts \
             from a pretraining checkpoint (beit or beit3)"
        )
    );

    // Without --checkpoint, --init must be a timm Beit (pixel input): imglish's token-input weights are not.
    let weights = format!("{ckpt}/model.safetensors");
    let o = imglish(&[
        "finetune",
        "--init",
        &weights,
        "--dataset",
        &ds,
        "--out",
        &w.path("x7"),
        "--steps",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: checkpoint {weights}: has no 'patch_embed.proj.weight': without --checkpoint, --init needs a \
             timm Beit state dict (a pixel-input encoder); give the pretraining checkpoint for other files"
        )
    );
    // Neither --checkpoint nor --init: a usage error.
    let o = imglish(&["finetune", "--dataset", &ds, "--out", &w.path("x8")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));

    // --init and --random-init: a usage error.
    let o = finetune(&run, &ds, &w.path("x5"), &["--random-init", "--init", "w.safetensors"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}

#[test]
fn train_refuses_another_runs_folder_and_names_the_changed_setting() {
    let w = Work::new();
    let ds = w.dataset("tokens", 40, true, 512);
    let out = w.path("r");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            &ds,
            "--out",
            &out,
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--dim",
            "32",
            "--depth",
            "2",
            "--heads",
            "2",
        ];
        args.extend_from_slice(extra);
        imglish(&args)
    };
    let last_line = |o: &std::process::Output| text(&o.stderr).trim().lines().last().unwrap_or("").to_string();
    let o = train(&["-q", "--stop-at", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = train(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: training on {ds} failed: invalid configuration: {out} already holds checkpoints: pass --resume \
             to continue that run, or choose another --out"
        )
    );
    // Nested settings are named leaf by leaf.
    let o = train(&["--resume", "--lr", "1e-3"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        last_line(&o),
        format!(
            "error: training on {ds} failed: checkpoint {out}/checkpoints/step-00000002: written by a run with \
             other settings: optim.lr: checkpoint 0.0015, now 0.001"
        )
    );
    let o = train(&["-q", "--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}
