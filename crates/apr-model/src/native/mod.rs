//! The model of `model.rs`, differentiated by hand on the CPU, and an engine over it.
//!
//! burn-flex spends most of a small model's training step outside its matrix products (per-op
//! dispatch and allocation, autodiff bookkeeping, padded `[b, h, s, s]` attention tensors).
//! This module computes the same function and its exact gradient over *packed* batches — the
//! sequences of a batch laid end to end, no padding — with a few large matrix products per layer and
//! rayon for everything row-wise. Attention keeps each row's log-sum-exp and recomputes its
//! probabilities in the backward pass, so the tape grows linearly with sequence length.
//!
//! Parameters live in one flat `f32` vector in [`crate::params::parameter_shapes`] order and HF
//! layout, so a gradient or an optimizer moment is one vector too. Every reduction runs in a
//! fixed order: results do not depend on the number of threads, and the matrix products give
//! the same bits on every CPU (one fused multiply-add chain per element), so a training run does
//! not depend on the machine either.
//!
//! * `batch`: [`PackedBatch`], what a training step takes;
//! * `kernels`: exp, reductions, RMSNorm, RoPE;
//! * `gemm`: strided matrix products, one register tile per [`crate::Simd`];
//! * `layout`: where each parameter sits in the flat vector;
//! * `attention`: causal attention over packed sequences, forward and backward;
//! * `block`: one decoder block, written once for training and the engine;
//! * `model`: [`NativeModel`], forward with a tape and the backward pass;
//! * `engine`: [`NativeEngine`], the batch-invariant decoder;
//! * `sample`: [`sample`], one draw from a row of logits.

mod attention;
mod batch;
mod block;
mod engine;
mod gemm;
mod kernels;
mod layout;
mod model;
mod sample;

pub use batch::{BatchError, PackedBatch};
pub use engine::NativeEngine;
pub use model::{Forward, NativeModel};
pub use sample::sample;
