//! `--init` (`init_params`) against timm: a timm `Beit` with random weights, saved as safetensors, loaded into
//! the Rust model gives timm's `forward_features` within 1e-4, at the same size and at another size (relative
//! position tables and absolute position embeddings resized as timm resizes them); the report names what the
//! file lacks and what the model lacks; a misshaped tensor is an error naming it.

use std::process::Command;

use imglish_train::{init_params, Beit, Input, InputKind, ModelConfig, RelPosBias};
use tch::{Device, Tensor};

mod common;

use common::{max_diff, python, repo};

struct Spec {
    img: i64,
    target: i64,
    rel_pos: RelPosBias,
    abs_pos: bool,
}

fn check(spec: Spec) -> imglish_train::InitReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let (patch, dim, depth, heads) = (8, 32, 2, 2);
    let json = serde_json::json!({
        "img_size": spec.img, "patch_size": patch, "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": 4.0,
        "rel_pos": match spec.rel_pos { RelPosBias::PerLayer => "per-layer", RelPosBias::Shared => "shared",
                                        RelPosBias::Off => "off" },
        "abs_pos": spec.abs_pos, "layer_scale": 0.1, "target_img_size": spec.target, "seed": 3,
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, json.to_string()).expect("spec");
    let out = Command::new(python())
        .arg(repo().join("train/tests/reference/timm_init.py"))
        .arg(&spec_path)
        .arg(dir.path())
        .output()
        .expect("run timm_init.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let grid = spec.target / patch;
    let config = ModelConfig {
        dim,
        depth,
        heads,
        mlp_ratio: 4.0,
        grid: [grid, grid],
        patch_size: patch,
        input: InputKind::Pixels,
        vocab_size: 64,
        rel_pos_bias: spec.rel_pos,
        abs_pos_emb: spec.abs_pos,
        layer_scale_init: Some(0.1),
        layer_norm_eps: 1e-6,
        drop_path: 0.0,
        init_std: 0.02,
    };
    let model = Beit::new(&config, Device::Cpu, 1).expect("model");
    let report = init_params(
        model.named_parameters(),
        &dir.path().join("timm.safetensors"),
        config.grid,
    )
    .expect("init");
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("expected.safetensors"))
            .expect("expected")
            .into_iter()
            .collect();
    let features = tch::no_grad(|| model.features(&Input::Pixels(expected["pixels"].shallow_clone()), None, None));
    let d = max_diff(&features, &expected["features"]);
    assert!(
        d < 1e-4,
        "forward_features differ by {d} ({} -> {} px)",
        spec.img,
        spec.target
    );
    report
}

#[test]
fn timm_weights_give_timms_features() {
    let r = check(Spec {
        img: 32,
        target: 32,
        rel_pos: RelPosBias::PerLayer,
        abs_pos: false,
    });
    assert!(r.resized.is_empty(), "{r:?}");
    assert_eq!(r.prefix, "");
    // timm's Beit has no MIM head or mask token; imglish's model has no classifier (num_classes=0: none saved).
    assert_eq!(r.missing, ["lm_head.bias", "lm_head.weight", "mask_token"], "{r:?}");
    assert!(r.unexpected.is_empty(), "{r:?}");
}

#[test]
fn another_grid_is_resized_as_timm_resizes() {
    let r = check(Spec {
        img: 32,
        target: 48,
        rel_pos: RelPosBias::PerLayer,
        abs_pos: true,
    });
    assert_eq!(
        r.resized,
        [
            "blocks.0.attn.relative_position_bias_table",
            "blocks.1.attn.relative_position_bias_table",
            "pos_embed"
        ]
    );
    check(Spec {
        img: 48,
        target: 32,
        rel_pos: RelPosBias::Shared,
        abs_pos: false,
    });
}

#[test]
fn a_misshaped_tensor_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("w.safetensors");
    Tensor::write_safetensors(
        &[("cls_token", Tensor::zeros([1, 1, 7], (tch::Kind::Float, Device::Cpu)))],
        &file,
    )
    .expect("write");
    let mut config = ModelConfig::preset("tiny", [4, 4], 64).expect("preset");
    config.dim = 32;
    config.depth = 1;
    config.heads = 2;
    let model = Beit::new(&config, Device::Cpu, 1).expect("model");
    let err = init_params(model.named_parameters(), &file, config.grid).expect_err("misshaped");
    assert_eq!(
        err.to_string(),
        format!(
            "checkpoint {}: tensor 'cls_token' has shape [1, 1, 7], this model's 'cls_token' is [1, 1, 32]",
            file.display()
        )
    );
    Tensor::write_safetensors(
        &[("something", Tensor::zeros([3], (tch::Kind::Float, Device::Cpu)))],
        &file,
    )
    .expect("write");
    let err = init_params(model.named_parameters(), &file, config.grid).expect_err("nothing matches");
    assert!(
        err.to_string()
            .contains("none of its 1 tensors is a parameter of this model"),
        "{err}"
    );
}
