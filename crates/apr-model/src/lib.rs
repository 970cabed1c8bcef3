//! The model of apr-rs: a Llama-2 decoder in burn 0.22 (device-dispatched: flex CPU by default,
//! wgpu and CUDA behind features) and its hand-differentiated CPU twin ([`native`]); the
//! [`Learner`] seam trainers drive either through, with AdamW; two slot-based KV-cache engines
//! over one [`SlotTable`]; a domain tokenizer; checkpoints in Hugging Face layout.
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod device_sample;
pub mod engine;
pub mod fast_ops;
pub mod invariant;
pub mod learner;
pub mod model;
pub mod native;
pub mod optim;
pub mod params;
pub mod simd;
pub mod static_step;
pub mod tokenizer;

pub use apr_core::SlotTable;
pub use burn;
pub use config::{ModelConfig, Preset};
pub use engine::{DecodePath, Engine};
pub use fast_ops::Precision;
pub use learner::{Learner, LearnerKind};
pub use model::{init_weights, HostTensor, Llama, Model, Weights};
pub use simd::Simd;
pub use tokenizer::AprTokenizer;
