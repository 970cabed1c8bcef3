//! The model of apr-rs: a Llama-2 decoder in burn 0.22 (device-dispatched: flex CPU by default,
//! wgpu and CUDA behind features), a domain tokenizer, a slot-based KV-cache inference engine,
//! and checkpoints in Hugging Face layout.
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod invariant;
pub mod model;
pub mod native;
pub mod tokenizer;

pub use burn;
pub use config::{ModelConfig, Preset};
pub use engine::Engine;
pub use model::{init_weights, HostTensor, Llama, Model, Weights};
pub use tokenizer::AprTokenizer;
