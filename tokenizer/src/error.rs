use std::path::PathBuf;

/// Everything that can go wrong in the tokenizer stage. Each variant names the file, model or sample at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ONNX Runtime shared library is not where it was looked for.
    #[error(
        "ONNX Runtime library not found at {}: run scripts/setup-onnxruntime (or set ORT_DYLIB_PATH to an existing libonnxruntime.so)",
        path.display()
    )]
    RuntimeMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The library exists but could not be loaded or initialised.
    #[error("cannot load ONNX Runtime from {}: {reason}", path.display())]
    RuntimeLoad {
        /// The library file.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// An execution provider was requested that this build or this machine cannot use.
    #[error("device {device}: {reason}")]
    Device {
        /// The requested device, as given (`cuda:0`, ...).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// ONNX Runtime refused a model or failed while running it.
    #[error("{model}: ONNX Runtime: {reason}")]
    Session {
        /// The model file (or a description for in-memory models).
        model: String,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// A model's inputs/outputs do not have the expected form.
    #[error("{model}: {reason}")]
    Model {
        /// The model file (or a description for in-memory models).
        model: String,
        /// The mismatch.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
