//! The Rust model against an independent PyTorch implementation (`reference/beit_reference.py`, run with the
//! torch of `scripts/setup-libtorch`): same weights, same inputs; features, logits, loss and every gradient
//! must agree within 1e-4.

use std::collections::BTreeMap;
use std::process::Command;

use imglish_train::{Beit, Input, InputKind, MaskKind, Masking, ModelConfig, RelPosBias};
use tch::{Device, Kind, Tensor};

mod common;

use common::{max_diff, python, repo};

fn check(config: ModelConfig, name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Beit::new(&config, Device::Cpu, 11).expect("model");
    // Move every parameter away from its structured initialisation (zero biases and tables, unit gammas) so
    // that each one influences the output.
    tch::manual_seed(5);
    tch::no_grad(|| {
        for (_, mut p) in model.named_parameters() {
            let noise = Tensor::randn_like(&p) * 0.05;
            let _ = p.g_add_(&noise);
        }
    });
    let weights = dir.path().join("model.safetensors");
    model.save(&weights).expect("save");

    let (b, n) = (3i64, config.num_patches());
    let masking = Masking::new(MaskKind::Blockwise, [config.grid[0] as usize, config.grid[1] as usize]).expect("mask");
    let mask: Vec<bool> = (0..b as u64).flat_map(|id| masking.mask(1, 0, id)).collect();
    let mask = Tensor::from_slice(&mask).view([b, n]);
    let targets = Tensor::randint(config.vocab_size, [b, n], (Kind::Int64, Device::Cpu));
    let (input, raw) = match config.input {
        InputKind::Tokens => (
            Input::Tokens(targets.shallow_clone()),
            ("tokens", targets.shallow_clone()),
        ),
        InputKind::Pixels => {
            let [h, w] = config.image_size();
            let px = Tensor::rand([b, 3, h, w], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
            (Input::Pixels(px.shallow_clone()), ("pixels", px))
        }
    };
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            (raw.0, raw.1),
            ("mask", mask.to_kind(Kind::Uint8)),
            ("targets", targets.shallow_clone()),
        ],
        &inputs,
    )
    .expect("inputs");
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config).expect("json")).expect("config");

    let features = model.features(&input, Some(&mask), None);
    let logits = model.mim_logits(&input, &mask, None);
    let masked_targets = targets.masked_select(&mask);
    let loss = logits.cross_entropy_for_logits(&masked_targets);
    loss.backward();

    let out = dir.path().join("out.safetensors");
    let status = Command::new(python())
        .arg(repo().join("train/tests/reference/beit_reference.py"))
        .args([&config_path, &weights, &inputs, &out])
        .status()
        .expect("run python");
    assert!(status.success(), "{name}: the PyTorch reference failed");
    let reference: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out).expect("read").into_iter().collect();

    let d = max_diff(&features, &reference["features"]);
    assert!(d < 1e-4, "{name}: features differ by {d}");
    let d = max_diff(&logits, &reference["logits"]);
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    let d = (loss.double_value(&[]) - reference["loss"].double_value(&[0])).abs();
    assert!(d < 1e-4, "{name}: loss differs by {d}");
    let params = model.named_parameters();
    assert_eq!(
        params.len(),
        reference.keys().filter(|k| k.starts_with("grad.")).count(),
        "{name}: parameter sets differ"
    );
    for (pname, p) in &params {
        let r = &reference[&format!("grad.{pname}")];
        let d = max_diff(&p.grad(), r);
        assert!(d < 1e-4, "{name}: gradient of {pname} differs by {d}");
    }
}

fn small(input: InputKind) -> ModelConfig {
    let mut c = ModelConfig::preset("tiny", [3, 4], 50).expect("preset");
    c.dim = 32;
    c.heads = 4;
    c.depth = 2;
    c.patch_size = 4;
    c.input = input;
    c
}

#[test]
fn token_input_with_shared_relative_bias_matches_pytorch() {
    check(small(InputKind::Tokens), "tokens/shared");
}

#[test]
fn pixel_input_with_per_layer_bias_and_abs_positions_matches_pytorch() {
    let mut c = small(InputKind::Pixels);
    c.rel_pos_bias = RelPosBias::PerLayer;
    c.abs_pos_emb = true;
    c.layer_scale_init = None;
    check(c, "pixels/per-layer");
}
