//! BEiT-3: the Multiway Transformer, its text masking, and masked data modelling on images, texts and
//! image-text pairs.

mod config;
mod data;
mod model;
mod retrieval;
mod text_mask;
mod trainer;

pub use config::{Beit3Config, BEIT3_PRESETS};
pub use data::{caption_for, Beit3Batch, Group, Objective, SampleKind, TextArrays};
pub(crate) use data::{fixed_set as beit3_fixed_set, Beit3Batcher, Beit3Builder};
pub use model::{Beit3, Encoded, ImageIn, TextIn, Way};
pub use retrieval::{probe_retrieval, Recall, RetrievalConfig, RetrievalReport};
pub use text_mask::{MaskedText, TextMasking};
pub use trainer::{load_beit3, train_beit3, Beit3Event, Beit3Metrics, Beit3Summary, Beit3TrainConfig, TaskMetrics};
