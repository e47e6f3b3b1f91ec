use anyhow::Context;
use imglish_tokenizer::{onnx, Model, SessionOptions};

use crate::output::Output;

/// Loads ONNX Runtime, runs a one-node model on it, and reports what this installation can do.
pub fn run(threads: usize, out: &Output) -> anyhow::Result<()> {
    let rt = imglish_tokenizer::runtime()?;
    let mut g = onnx::GraphBuilder::new("doctor");
    let dims = [onnx::Dim::from(2)];
    g.input("x", onnx::proto::data_type::FLOAT, &dims)
        .output("y", onnx::proto::data_type::FLOAT, &dims)
        .node("Relu", &["x"], &["y"], &[]);
    let mut model = Model::from_bytes(
        "doctor self-test",
        &onnx::encode(&g.finish()),
        &SessionOptions::default(),
    )?;
    let y = model
        .run_f32(&[2], &[-1.0, 2.0])
        .context("ONNX Runtime self-test failed")?;
    anyhow::ensure!(
        y == imglish_tokenizer::Output::F32 {
            shape: vec![2],
            data: vec![0.0, 2.0]
        },
        "ONNX Runtime self-test gave a wrong result: {y:?}"
    );
    imglish_train::set_threads(threads);
    let torch = imglish_train::torch_self_test()?;
    let gpu = if cfg!(feature = "cuda") {
        "compiled in (feature `cuda`)"
    } else {
        "not compiled in"
    };
    let text = format!(
        "imglish {}\nonnx runtime: {}\n  {}\n  self-test: ok\ngpu execution providers: {gpu}\nlibtorch {} \
         (trainer): self-test ok, {} CUDA device(s){}\nthreads: {threads}",
        env!("CARGO_PKG_VERSION"),
        rt.library().display(),
        rt.build_info().trim(),
        torch.version,
        torch.cuda_devices,
        if torch.cudnn { ", cuDNN" } else { "" },
    );
    out.summary(
        &text,
        &serde_json::json!({
            "event": "doctor",
            "version": env!("CARGO_PKG_VERSION"),
            "onnxruntime": rt.library(),
            "onnxruntime_build": rt.build_info().trim(),
            "gpu": cfg!(feature = "cuda"),
            "libtorch": torch,
            "threads": threads,
        }),
    );
    Ok(())
}
