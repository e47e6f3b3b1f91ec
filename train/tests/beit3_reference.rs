//! The Rust BEiT-3 model against torchscale 0.3.0's `BEiT3` (installed into the torch venv by
//! `scripts/setup-libtorch`; run by `reference/beit3_torchscale.py`): same weights (loaded with
//! `strict=True`), image-only, text-only (padded) and image-text pair inputs; encoder outputs and MIM/MLM logits
//! must agree within 1e-4.

use std::collections::BTreeMap;
use std::process::Command;

use imglish_train::{Beit3, Beit3Config, ImageIn, Input, InputKind, MaskKind, Masking, TextIn};
use tch::{Device, Kind, Tensor};

mod common;

use common::{max_diff, python, repo};

fn small(tie: bool) -> Beit3Config {
    let mut c = Beit3Config::preset("beit3-tiny", [3, 3], 40, 50).expect("preset");
    c.dim = 32;
    c.heads = 4;
    c.depth = 2;
    c.ffn_dim = 48;
    c.patch_size = 4;
    c.input = InputKind::Pixels;
    c.max_source_positions = 16;
    c.tie_mlm_head = tie;
    c
}

fn check(config: Beit3Config, name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Beit3::new(&config, Device::Cpu, 3).expect("model");
    // Move every parameter away from its structured initialisation so that each one influences the output.
    tch::manual_seed(9);
    tch::no_grad(|| {
        for (_, mut p) in model.named_parameters() {
            let noise = Tensor::randn_like(&p) * 0.05;
            let _ = p.g_add_(&noise);
        }
    });
    let weights = dir.path().join("model.safetensors");
    model.save(&weights).expect("save");
    let kwargs = dir.path().join("torchscale.json");
    let json = config.torchscale_kwargs().expect("kwargs");
    std::fs::write(&kwargs, serde_json::to_vec(&json).expect("json")).expect("write");

    let (b, n, l) = (3i64, config.num_patches(), 7i64);
    let [h, w] = config.image_size();
    let pixels = Tensor::rand([b, 3, h, w], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let masking = Masking::new(MaskKind::Blockwise, [3, 3]).expect("masking");
    let image_mask: Vec<bool> = (0..b as u64).flat_map(|id| masking.mask(1, 0, id)).collect();
    let image_mask = Tensor::from_slice(&image_mask).view([b, n]);
    let text = Tensor::randint_low(5, config.text_vocab_size, [b, l], (Kind::Int64, Device::Cpu));
    // Row 0 unpadded, row 1 with 2 pads, row 2 with 4.
    let lengths = [7i64, 5, 3];
    let padding: Vec<bool> = lengths.iter().flat_map(|&k| (0..l).map(move |i| i >= k)).collect();
    let padding = Tensor::from_slice(&padding).view([b, l]);
    let predict: Vec<bool> = lengths
        .iter()
        .flat_map(|&k| (0..l).map(move |i| i < k && (i + k) % 2 == 0))
        .collect();
    let predict = Tensor::from_slice(&predict).view([b, l]);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("pixels", pixels.shallow_clone()),
            ("image_mask", image_mask.to_kind(Kind::Uint8)),
            ("text", text.shallow_clone()),
            ("padding", padding.to_kind(Kind::Uint8)),
            ("text_predict", predict.to_kind(Kind::Uint8)),
        ],
        &inputs,
    )
    .expect("inputs");

    let input = Input::Pixels(pixels);
    let image = ImageIn {
        input: &input,
        mask: Some(&image_mask),
    };
    let txt = TextIn {
        ids: &text,
        padding: Some(&padding),
    };
    let mut ours: BTreeMap<String, Tensor> = BTreeMap::new();
    let e = model.encode(Some(&image), None, None);
    ours.insert("image.mim".into(), model.mim_logits(&e, &image_mask));
    ours.insert("image.encoder".into(), e.x);
    let e = model.encode(None, Some(&txt), None);
    ours.insert("text.mlm".into(), model.mlm_logits(&e, &predict));
    ours.insert("text.encoder".into(), e.x);
    let e = model.encode(Some(&image), Some(&txt), None);
    ours.insert("pair.mim".into(), model.mim_logits(&e, &image_mask));
    ours.insert("pair.mlm".into(), model.mlm_logits(&e, &predict));
    ours.insert("pair.encoder".into(), e.x);

    // The same weights as unilm's BEiT-3 stores them (the encoder under `beit3.`, its own heads beside it) give
    // another model the same encoder through `--init` (`init_params`); imglish's heads are reported missing.
    let unilm = dir.path().join("unilm.safetensors");
    let mut named: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("mim_head.") && !n.starts_with("mlm_head."))
        .map(|(n, t)| (format!("beit3.{n}"), t.detach()))
        .collect();
    named.push((
        "vision_head.weight".into(),
        Tensor::zeros([2, config.dim], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&named, &unilm).expect("unilm weights");
    let other = Beit3::new(&config, Device::Cpu, 77).expect("model");
    let report = imglish_train::init_params(other.named_parameters(), &unilm, config.grid).expect("init");
    assert_eq!(report.prefix, "beit3.");
    assert_eq!(report.unexpected, ["vision_head.weight"]);
    assert!(
        report
            .missing
            .iter()
            .all(|n| n.starts_with("mim_head.") || n.starts_with("mlm_head.")),
        "{report:?}"
    );
    let d = max_diff(&other.encode(Some(&image), None, None).x, &ours["image.encoder"]);
    assert!(d < 1e-6, "{name}: --init from unilm-style weights differs by {d}");

    let out = dir.path().join("out.safetensors");
    let status = Command::new(python())
        .arg(repo().join("train/tests/reference/beit3_torchscale.py"))
        .args([&kwargs, &weights, &inputs, &out])
        .status()
        .expect("run python");
    assert!(status.success(), "{name}: torchscale's BEiT3 failed");
    let reference: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out).expect("read").into_iter().collect();
    assert_eq!(
        reference.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "{name}: outputs differ"
    );
    for (key, t) in &ours {
        let r = &reference[key];
        // Padded text positions are zeroed before the first layer but not after; compare them too (torchscale
        // computes them the same way).
        let d = max_diff(t, r);
        assert!(d < 1e-4, "{name}: {key} differs from torchscale by {d}");
        assert!(
            t.abs().max().double_value(&[]) > 0.1,
            "{name}: {key} is trivially small"
        );
    }
}

#[test]
fn beit3_matches_torchscale_on_images_texts_and_pairs() {
    check(small(false), "untied");
}

#[test]
fn beit3_with_tied_mlm_head_matches_torchscale() {
    check(small(true), "tied");
}
