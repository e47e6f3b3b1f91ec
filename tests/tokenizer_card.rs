//! `imglish tokenizer card` on a third-party ONNX model whose weights live in an external data file: the card
//! reads grid, vocabulary and output kind off a probe batch, records the sha256 of the model and of the data
//! file, and the model then loads by path from any working directory; a probe that gives no token grid is one
//! line naming the shape.

use imglish_tokenizer::onnx::{self, proto::data_type::FLOAT, Attr, Dim, GraphBuilder};

mod common;

use common::text;

/// `x [B, 3, 16, 16]` → 8x8 stride-8 convolution to `codes` channels: logits `[B, codes, 2, 2]`.
fn conv_model(codes: i64) -> Vec<u8> {
    let mut g = GraphBuilder::new("third-party");
    let b = || Dim::from("batch");
    g.input("x", FLOAT, &[b(), Dim::from(3), Dim::from(16), Dim::from(16)])
        .output("logits", FLOAT, &[b(), Dim::from(codes), Dim::from(2), Dim::from(2)]);
    let w: Vec<f32> = (0..codes * 3 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
        .collect();
    g.initializer_f32("w", &[codes, 3, 8, 8], &w);
    g.node("Conv", &["x", "w"], &["logits"], &[("strides", Attr::Ints(vec![8, 8]))]);
    onnx::encode(&g.finish())
}

#[test]
fn card_for_a_model_with_external_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("vendor");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let mut proto = onnx::decode(&conv_model(24)).expect("decode");
    let weights = onnx::externalize(&mut proto, "w", "weights.bin");
    let model = folder.join("enc.onnx");
    std::fs::write(&model, onnx::encode(&proto)).expect("model");
    std::fs::write(folder.join("weights.bin"), &weights).expect("weights");

    // Run from another directory: the external data is resolved from the model's folder.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_imglish"))
        .current_dir(dir.path())
        .args([
            "tokenizer",
            "card",
            "--onnx",
            "vendor/enc.onnx",
            "--input-size",
            "16",
            "--normalization",
            "minus-one-one",
        ])
        .output()
        .expect("run imglish");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("enc.card.json")).expect("card")).expect("json");
    assert_eq!(card["grid"], serde_json::json!([2, 2]));
    assert_eq!(card["vocab_size"], 24);
    assert_eq!(card["output"], "logits");
    assert_eq!(card["name"], "enc");
    assert_eq!(
        card["external_data"]["weights.bin"],
        imglish_tokenizer::sha256_hex(&weights)
    );
    assert!(
        text(&o.stdout).contains("1 external data file(s)"),
        "{}",
        text(&o.stdout)
    );

    // A model whose probe output is no token grid.
    let mut g = GraphBuilder::new("flat");
    g.input(
        "x",
        FLOAT,
        &[Dim::from("b"), Dim::from(3), Dim::from(16), Dim::from(16)],
    )
    .output("y", FLOAT, &[Dim::from("b"), Dim::from(768)]);
    g.initializer_i64("shape", &[2], &[0, -1]);
    g.node("Reshape", &["x", "shape"], &["y"], &[]);
    let flat = folder.join("flat.onnx");
    std::fs::write(&flat, onnx::encode(&g.finish())).expect("flat");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_imglish"))
        .args([
            "tokenizer",
            "card",
            "--onnx",
            flat.to_str().expect("utf8"),
            "--input-size",
            "16",
            "--normalization",
            "imagenet",
        ])
        .output()
        .expect("run imglish");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr).trim().lines().last().unwrap_or(""),
        format!(
            "error: {}: output shape [2, 768] for a batch of 2: expected logits [2, V, h, w] or indices [2, h, w]",
            flat.display()
        )
    );
}
