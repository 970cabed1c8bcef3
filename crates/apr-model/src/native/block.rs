//! One decoder block on the host, written once for training and for the engine:
//! RMSNorm → q, k, v → causal attention → output projection → residual; RMSNorm → SwiGLU →
//! residual. The two differ only in their [`BlockOps`]: training runs `gemm` and flash attention
//! over packed sequences and keeps a tape; the engine runs the batch-invariant kernels and
//! attends over each slot's KV cache.

use super::kernels::{copy_of, rms_forward, swiglu, zeros};
use super::layout::BlockOffsets;
use crate::config::ModelConfig;

/// The kernels a block runs on.
pub(super) trait BlockOps {
    /// What attention keeps for a backward pass (nothing, for the engine).
    type Saved;

    /// `out = x · Wᵀ` (or `+=` when `accumulate`) for the `[w.len() / in_dim, in_dim]` weight.
    fn linear(&self, out: &mut [f32], accumulate: bool, x: &[f32], w: &[f32], in_dim: usize);

    /// `x · Wᵀ` as a new `[n, w.len() / in_dim]` buffer.
    fn project(&self, x: &[f32], w: &[f32], in_dim: usize) -> Vec<f32> {
        let mut out = zeros(x.len() / in_dim * (w.len() / in_dim));
        self.linear(&mut out, false, x, w, in_dim);
        out
    }

    /// Causal attention of the block's `[n, d]` queries, keys and values (before RoPE):
    /// `[n, d]` rows, heads merged.
    fn attention(&mut self, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> (Vec<f32>, Self::Saved);
}

/// A block's activations, as its backward pass reads them.
pub(super) struct BlockActs {
    /// Input rows.
    pub(super) x: Vec<f32>,
    pub(super) inv_rms1: Vec<f32>,
    pub(super) xn1: Vec<f32>,
    /// Attention output, heads merged: `[n, d]`.
    pub(super) att: Vec<f32>,
    /// After the attention residual.
    pub(super) x_mid: Vec<f32>,
    pub(super) inv_rms2: Vec<f32>,
    pub(super) xn2: Vec<f32>,
    pub(super) gate: Vec<f32>,
    pub(super) up: Vec<f32>,
    /// `silu(gate) · up`.
    pub(super) hidden: Vec<f32>,
}

/// Block `o` of the model with flat parameters `params` on the rows `x`: the next rows, the
/// activations, and what attention kept.
pub(super) fn block_forward<O: BlockOps>(
    c: &ModelConfig,
    params: &[f32],
    o: &BlockOffsets,
    x: Vec<f32>,
    ops: &mut O,
) -> (Vec<f32>, BlockActs, O::Saved) {
    let w = move |offset: usize, len: usize| &params[offset..offset + len];
    let (d, f, eps) = (c.d_model, c.d_ff, c.norm_eps as f32);
    let n = x.len() / d;
    let (inv_rms1, xn1) = rms_forward(&x, w(o.attn_norm, d), d, eps);
    let project = |offset: usize| ops.project(&xn1, w(offset, d * d), d);
    let (q, k, v) = (project(o.q), project(o.k), project(o.v));
    let (att, saved) = ops.attention(q, k, v);
    let mut x_mid = copy_of(&x);
    ops.linear(&mut x_mid, true, &att, w(o.o, d * d), d);

    let (inv_rms2, xn2) = rms_forward(&x_mid, w(o.mlp_norm, d), d, eps);
    let gate = ops.project(&xn2, w(o.gate, f * d), d);
    let up = ops.project(&xn2, w(o.up, f * d), d);
    let mut hidden = zeros(n * f);
    swiglu(&mut hidden, &gate, &up, f);
    let mut x_next = copy_of(&x_mid);
    ops.linear(&mut x_next, true, &hidden, w(o.down, d * f), f);
    let acts = BlockActs {
        x,
        inv_rms1,
        xn1,
        att,
        x_mid,
        inv_rms2,
        xn2,
        gate,
        up,
        hidden,
    };
    (x_next, acts, saved)
}
