//! # imglish-tokenizer: stage 2, images and captions into discrete tokens
//!
//! Every accepted image of an ingest manifest becomes several *views*; each view is run through a visual
//! tokenizer, a dVAE or VQ encoder stored as an ONNX model, and becomes a grid of discrete visual tokens (BEiT's
//! "image as a foreign language"). Captions become text token ids.
//!
//! This crate holds the pieces that stage needs:
//! - [`runtime()`]: the one ONNX Runtime environment of the process. The library is loaded at run time
//!   (`ort`'s `load-dynamic`) from `$ORT_DYLIB_PATH` or from where `scripts/setup-onnxruntime` put it; a missing
//!   library is an [`Error::RuntimeMissing`] naming that script.
//! - [`Model`]: an ONNX session on a chosen [`Device`] (CPU, or CUDA/TensorRT with the `cuda` feature).
//! - [`onnx`]: writing ONNX models from Rust (a hand-written `prost` subset of `onnx.proto`), used for the
//!   tokenizers imglish fits itself.
//!
//! ```
//! use imglish_tokenizer::onnx::{proto::data_type::FLOAT, Dim, GraphBuilder};
//! use imglish_tokenizer::{Model, Output, SessionOptions};
//!
//! # fn main() -> Result<(), imglish_tokenizer::Error> {
//! // y = relu(x): a one-node model written from Rust and run through ONNX Runtime.
//! let mut g = GraphBuilder::new("relu");
//! g.input("x", FLOAT, &[Dim::from("n")]).output("y", FLOAT, &[Dim::from("n")]);
//! g.node("Relu", &["x"], &["y"], &[]);
//! let bytes = imglish_tokenizer::onnx::encode(&g.finish());
//! let mut model = Model::from_bytes("relu", &bytes, &SessionOptions::default())?;
//! let out = model.run_f32(&[3], &[-1.0, 0.5, 2.0])?;
//! assert_eq!(out, Output::F32 { shape: vec![3], data: vec![0.0, 0.5, 2.0] });
//! # Ok(())
//! # }
//! ```

mod card;
pub mod dvae;
mod error;
mod kmeans;
pub mod onnx;
mod ordered;
pub mod quality;
mod runtime;
mod session;
mod text;
mod tokenize;
mod views;

pub use card::{
    card_for_model, external_data_hashes, sha256_hex, Card, CardSpec, DecoderRef, Normalization, OutputKind,
    TokenDecoder, VisualTokenizer, CARD_VERSION,
};
pub use error::{Error, Result};
pub use kmeans::{fit_codebook, Codebook, FitConfig, FitReport, PatchFeatures};
pub use runtime::{library_path, runtime, Runtime};
pub use session::{Device, Model, Output, OutputView, SessionOptions, TensorInfo};
pub use text::{fit_text_tokenizer, TextModel, TextTokenizer, SPECIAL_TOKENS};
pub use tokenize::{tokenize, PixelsConfig, TokenizeConfig, TokenizeSummary};
