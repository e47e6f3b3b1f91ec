//! Fine-tuning's classifier against timm: a timm `Beit` with `global_pool='avg'` (mean pooling, `fc_norm`, head)
//! and random weights, saved as safetensors and loaded into [`Classifier`] with `init_params`, gives timm's logits
//! within 1e-4, from per-block relative position tables and from timm's shared table (copied into every block,
//! as BEiT fine-tunes a pretrained model).

use std::process::Command;

use imglish_train::{init_params, Backbone, Classifier, Input, InputKind, ModelConfig, RelPosBias};
use tch::{Device, Tensor};

mod common;

use common::{max_diff, python, repo};

fn check(rel_pos: &str) -> imglish_train::InitReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, patch, dim, depth, heads, classes) = (32, 8, 32, 2, 2, 7);
    let json = serde_json::json!({
        "img_size": img, "patch_size": patch, "dim": dim, "depth": depth, "heads": heads, "classes": classes,
        "rel_pos": rel_pos, "seed": 5,
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, json.to_string()).expect("spec");
    let out = Command::new(python())
        .arg(repo().join("train/tests/reference/timm_finetune.py"))
        .arg(&spec_path)
        .arg(dir.path())
        .output()
        .expect("run timm_finetune.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let config = ModelConfig {
        dim,
        depth,
        heads,
        mlp_ratio: 4.0,
        grid: [img / patch; 2],
        patch_size: patch,
        input: InputKind::Pixels,
        vocab_size: 64,
        rel_pos_bias: RelPosBias::Shared,
        abs_pos_emb: false,
        layer_scale_init: Some(0.1),
        layer_norm_eps: 1e-6,
        drop_path: 0.0,
        init_std: 0.02,
    };
    // The pretraining layout (shared table) becomes the fine-tuning one (a table per block).
    let backbone = Backbone::Beit(config).for_finetuning(0.0);
    let Backbone::Beit(c) = &backbone else { unreachable!() };
    assert_eq!(c.rel_pos_bias, RelPosBias::PerLayer);
    let model = Classifier::new(&backbone, classes, Device::Cpu, 1).expect("classifier");
    let report = init_params(
        model.named_parameters(),
        &dir.path().join("timm.safetensors"),
        [img / patch; 2],
    )
    .expect("init");
    assert!(report.missing.is_empty(), "{}", report.summary());
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("expected.safetensors"))
            .expect("expected")
            .into_iter()
            .collect();
    let logits = tch::no_grad(|| model.logits(&Input::Pixels(expected["pixels"].shallow_clone()), None));
    let d = max_diff(&logits, &expected["logits"]);
    assert!(d < 1e-4, "logits differ by {d} (timm rel_pos {rel_pos})");
    report
}

#[test]
fn classifier_equals_timm_beit_with_mean_pooling() {
    let report = check("per-layer");
    assert_eq!(report.from_shared, 0);
    assert!(report.unexpected.is_empty(), "{}", report.summary());
}

#[test]
fn a_shared_table_fills_every_block() {
    let report = check("shared");
    assert_eq!(report.from_shared, 2);
    assert!(
        report
            .summary()
            .contains("2 per-layer relative position tables from the shared one"),
        "{}",
        report.summary()
    );
    assert!(report.unexpected.is_empty(), "{}", report.summary());
}
