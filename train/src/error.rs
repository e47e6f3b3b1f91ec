//! The trainer's error type: every variant names what it is about (a checkpoint file, the dataset, the device,
//! a setting) so that one line is enough to act on.

use std::path::PathBuf;

/// Everything that can go wrong while building a model, streaming data, training, checkpointing or probing.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is invalid (checked when it is set, before any work starts).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The requested device is not available.
    #[error("{0}")]
    Device(String),
    /// The dataset could not be opened or read.
    #[error(transparent)]
    Pack(#[from] imglish_pack::PackError),
    /// The dataset does not fit the model or the run (no labels, no pixels, wrong grid, empty split).
    #[error("dataset {}: {reason}", path.display())]
    Dataset {
        /// The dataset directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A sample could not be turned into model input (its stored pixels do not decode, say).
    #[error("sample {sample_id}: {reason}")]
    Sample {
        /// The sample.
        sample_id: u64,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint is missing, incomplete or does not match the run.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// libtorch reported an error.
    #[error("{context}: {source}")]
    Torch {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: tch::TchError,
    },
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is {loss} (lower the learning rate or enable gradient clipping)")]
    Diverged {
        /// The step.
        step: u64,
        /// The loss value.
        loss: f64,
    },
}

/// The crate's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}

pub(crate) fn torch_err(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> TrainError {
    let context = context.into();
    move |source| TrainError::Torch { context, source }
}
