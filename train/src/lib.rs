//! # imglish-train: stage 4, the streaming masked-image-modeling trainer
//!
//! Pretrains a BEiT-style encoder by predicting the visual tokens of masked patches, streaming a dataset that
//! `imglish pack` wrote. The pieces:
//!
//! - [`ModelConfig`] with presets (`tiny`, `small`, `base`, `large`) and free sizes; [`Beit`] builds the encoder
//!   (CLS token, token embedding or 16x16 patch embedding, mask token, shared or per-layer relative position
//!   bias, layer scale, pre-LayerNorm blocks with q/v biases, stochastic depth) and the MIM head. Parameter
//!   names are those of the reference BEiT code and timm's `beit_*` models.
//! - [`Masking`]: BEiT's blockwise generator (or random masking), a pure function of `(seed, epoch, sample_id)`.
//! - [`train`]: pack's streaming reader on a background thread, AdamW with warmup + cosine, accumulation,
//!   clipping, validation with fixed masks, checkpoints (safetensors) that resume exactly, `metrics.jsonl` and
//!   `loss.png`.
//! - [`finetune`]: image classification fine-tuning (BEiT's recipe: layer decay, mixup/CutMix, best checkpoint).
//! - [`probe`]: a linear probe of a checkpoint's frozen encoder against a random encoder.
//! - [`dvae`]: a learned discrete VAE tokenizer (DALL-E's Gumbel-softmax recipe), exported to ONNX by
//!   `imglish_tokenizer::dvae`.
//!
//! libtorch comes from the PyPI `torch==2.13.0` wheel (`scripts/setup-libtorch`).
//!
//! ```
//! use imglish_train::{Beit, Input, MaskKind, Masking, ModelConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A 2-layer model for a 4x4 token grid over a 64-code visual vocabulary.
//! let mut config = ModelConfig::preset("tiny", [4, 4], 64)?;
//! config.depth = 2;
//! let model = Beit::new(&config, tch::Device::Cpu, 0)?;
//!
//! let masking = Masking::new(MaskKind::Blockwise, [4, 4])?;
//! let mask: Vec<bool> = (0..3).flat_map(|id| masking.mask(0, 0, id)).collect();
//! let mask = tch::Tensor::from_slice(&mask).view([3, 16]);
//! let tokens = tch::Tensor::randint(64, [3, 16], (tch::Kind::Int64, tch::Device::Cpu));
//!
//! let logits = model.mim_logits(&Input::Tokens(tokens), &mask, None);
//! assert_eq!(logits.size(), [3 * masking.count() as i64, 64]);
//! # Ok(())
//! # }
//! ```

mod allocator;
mod batches;
mod beit3;
mod config;
mod data;
mod device;
pub mod dvae;
mod embed;
mod error;
mod finetune;
mod init;
mod masking;
mod model;
mod optim;
mod options;
mod originals;
mod plot;
mod probe;
mod tensors;
mod trainer;

pub use allocator::reuse_freed_memory;
pub use batches::{Array, BatchMaker, MadeBatch};
pub use beit3::{
    caption_for, load_beit3, probe_retrieval, train_beit3, Beit3, Beit3Batch, Beit3Config, Beit3Event, Beit3Metrics,
    Beit3Summary, Beit3TrainConfig, Encoded, Group, ImageIn, MaskedText, Objective, Recall, RetrievalConfig,
    RetrievalReport, SampleKind, TaskMetrics, TextArrays, TextIn, TextMasking, Way, BEIT3_PRESETS,
};
pub use config::{InputKind, ModelConfig, RelPosBias, PRESETS};
pub use data::{Batch, DeviceBatch, FixedSet, Loader, StreamConfig};
pub use device::{torch_self_test, Precision, TorchDevice, TorchInfo};
pub use embed::{embed, EmbedConfig, EmbedSummary, Pool};
pub use error::{Result, TrainError};
pub use finetune::{
    finetune, finetune_config, load_classifier, Backbone, Classifier, FinetuneConfig, FinetuneEvent, FinetuneMetrics,
    FinetuneOptions, FinetuneSummary, MixConfig, Start,
};
pub use init::{init_params, timm_beit_config, InitReport};
pub use masking::{MaskKind, Masking};
pub use model::{relative_position_index, Beit, Input};
pub use optim::{decays, AdamW, OptimConfig};
pub use options::{ModelKind, TrainOptions};
pub use plot::plot_losses;
pub use probe::{probe, ProbeConfig, ProbeReport};
pub use trainer::{
    checkpoint_architecture, checkpoint_name, evaluate, latest_checkpoint, load_model, resolve_checkpoint, train,
    DataMode, EvalMetrics, Event, RunOptions, StepMetrics, TrainConfig, TrainSummary, CHECKPOINT_VERSION,
};

/// Sets libtorch's intra-op thread count (the `--threads` knob).
pub fn set_threads(n: usize) {
    tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
}

/// What every command that runs a model calls first: libtorch's thread count ([`set_threads`]) and the allocator
/// settings for training ([`reuse_freed_memory`]).
pub fn prepare_process(threads: usize) {
    set_threads(threads);
    reuse_freed_memory();
}
