//! The model of `model.rs`, differentiated by hand on the CPU.
//!
//! burn-flex spends most of a small model's training step outside its matrix products (per-op
//! dispatch and allocation, autodiff bookkeeping, padded `[b, h, s, s]` attention tensors).
//! This module computes the same function and its exact gradient over *packed* batches — the
//! sequences of a batch laid end to end, no padding — with a few large `gemm` calls per layer and
//! rayon for everything row-wise. Attention keeps each row's log-sum-exp and recomputes its
//! probabilities in the backward pass, so the tape grows linearly with sequence length.
//!
//! Parameters live in one flat `f32` vector in [`parameter_shapes`] order and HF layout, so a
//! gradient or an optimizer moment is one vector too. Every reduction runs in a fixed order:
//! results do not depend on the number of threads.

use std::collections::BTreeMap;

use apr_core::decoder::{
    uniform_at, BatchedDecoder, DecoderError, Sampled, Sampling, SlotId, StepInput,
};
use gemm::{gemm, Parallelism};

use crate::invariant::{self, dot};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::engine::check_step;
use crate::model::{parameter_shapes, HostTensor, Weights, WeightsError};

/// Offsets of one block's tensors in the flat parameter vector.
#[derive(Clone, Copy, Debug)]
struct BlockOffsets {
    attn_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    mlp_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// Where every tensor sits in the flat parameter vector.
#[derive(Clone, Debug)]
struct Layout {
    names: Vec<(String, Vec<usize>, usize)>,
    embed: usize,
    blocks: Vec<BlockOffsets>,
    norm: usize,
    head: usize,
    total: usize,
}

impl Layout {
    fn of(config: &ModelConfig) -> Layout {
        let mut names = Vec::new();
        let mut offsets = BTreeMap::new();
        let mut total = 0;
        for (name, shape) in parameter_shapes(config) {
            offsets.insert(name.clone(), total);
            let len: usize = shape.iter().product();
            names.push((name, shape, total));
            total += len;
        }
        let at = |name: String| offsets[&name];
        let blocks = (0..config.n_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                BlockOffsets {
                    attn_norm: at(format!("{p}.input_layernorm.weight")),
                    q: at(format!("{p}.self_attn.q_proj.weight")),
                    k: at(format!("{p}.self_attn.k_proj.weight")),
                    v: at(format!("{p}.self_attn.v_proj.weight")),
                    o: at(format!("{p}.self_attn.o_proj.weight")),
                    mlp_norm: at(format!("{p}.post_attention_layernorm.weight")),
                    gate: at(format!("{p}.mlp.gate_proj.weight")),
                    up: at(format!("{p}.mlp.up_proj.weight")),
                    down: at(format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        Layout {
            embed: at("model.embed_tokens.weight".into()),
            norm: at("model.norm.weight".into()),
            head: at("lm_head.weight".into()),
            names,
            blocks,
            total,
        }
    }
}

/// Sequences laid end to end: `inputs[n]` predicts `targets[n]`, and sequence `s` covers packed
/// positions `bounds[s]..bounds[s + 1]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedBatch {
    /// Input token of every packed position.
    pub inputs: Vec<u32>,
    /// The token each position predicts.
    pub targets: Vec<u32>,
    /// Sequence boundaries, starting at 0 and ending at `inputs.len()`.
    pub bounds: Vec<usize>,
}

impl PackedBatch {
    /// Packs whole token sequences: each contributes `len − 1` (input, next token) pairs.
    pub fn from_sequences(sequences: &[&[u32]]) -> Self {
        let mut batch = PackedBatch {
            bounds: vec![0],
            ..Default::default()
        };
        for seq in sequences {
            if seq.len() >= 2 {
                batch.inputs.extend_from_slice(&seq[..seq.len() - 1]);
                batch.targets.extend_from_slice(&seq[1..]);
                batch.bounds.push(batch.inputs.len());
            }
        }
        batch
    }

    /// Packed positions.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// No positions at all.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Position of every packed token inside its own sequence.
    fn positions(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.len());
        for w in self.bounds.windows(2) {
            out.extend(0..w[1] - w[0]);
        }
        out
    }
}

/// Why a batch cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary of {1}")]
    Token(u32, usize),
    /// A sequence longer than the RoPE tables.
    #[error("a sequence of {0} positions exceeds max_seq_len {1}")]
    TooLong(usize, usize),
    /// Boundaries that do not describe the inputs.
    #[error("batch boundaries do not cover its {0} positions")]
    Bounds(usize),
}

/// What the backward pass needs of one block.
struct BlockTape {
    x: Vec<f32>,
    inv_rms1: Vec<f32>,
    xn1: Vec<f32>,
    /// Head-major `[h, n, hd]`, after RoPE.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[h, n]`: log-sum-exp of every attention row.
    lse: Vec<f32>,
    /// Attention output, heads merged: `[n, d]`.
    att: Vec<f32>,
    x_mid: Vec<f32>,
    inv_rms2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    hidden: Vec<f32>,
}

/// The result of a forward pass, with what its backward pass needs.
pub struct Forward {
    /// `log p(target)` of every packed position.
    pub logprobs: Vec<f32>,
    /// Entropy of every position's next-token distribution.
    pub entropy: Vec<f32>,
    blocks: Vec<BlockTape>,
    x_final: Vec<f32>,
    inv_rms_final: Vec<f32>,
    xn_final: Vec<f32>,
    probs: Vec<f32>,
    batch: PackedBatch,
    positions: Vec<usize>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("positions", &self.batch.len())
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

/// The Llama of [`crate::model`] as flat host parameters with a hand-written gradient.
#[derive(Clone, Debug)]
pub struct NativeModel {
    /// Shape.
    pub config: ModelConfig,
    /// Every parameter, [`parameter_shapes`] order, HF layout.
    pub params: Vec<f32>,
    layout: Layout,
    /// `[max_seq_len, head_dim / 2]` RoPE tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl NativeModel {
    /// The model with these weights (every tensor of [`parameter_shapes`], shapes checked).
    pub fn from_weights(config: &ModelConfig, weights: &Weights) -> Result<Self, WeightsError> {
        let layout = Layout::of(config);
        let mut params = vec![0.0; layout.total];
        for (name, shape, offset) in &layout.names {
            let t = weights
                .get(name)
                .ok_or_else(|| WeightsError::Missing(name.clone()))?;
            if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                return Err(WeightsError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
            params[*offset..*offset + t.data.len()].copy_from_slice(&t.data);
        }
        let (hd, n) = (config.head_dim(), config.max_seq_len);
        let half = hd / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        // The same f64 angles as `model::Rope`, so both paths see identical tables.
        for pos in 0..n {
            for i in 0..half {
                let inv_freq = 1.0 / config.rope_theta.powf((2 * i) as f64 / hd as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(NativeModel {
            config: config.clone(),
            params,
            layout,
            cos,
            sin,
        })
    }

    /// The weights as named tensors.
    pub fn to_weights(&self) -> Weights {
        self.split(&self.params)
    }

    /// Any flat vector of parameter size (a gradient, a moment) as named tensors.
    pub fn split(&self, flat: &[f32]) -> Weights {
        self.layout
            .names
            .iter()
            .map(|(name, shape, offset)| {
                let n: usize = shape.iter().product();
                (
                    name.clone(),
                    HostTensor {
                        shape: shape.clone(),
                        data: flat[*offset..*offset + n].to_vec(),
                    },
                )
            })
            .collect()
    }

    /// The flat vector of named tensors laid out as the parameters (`None` if one is missing
    /// or has another size).
    pub fn join(&self, named: &BTreeMap<String, HostTensor>, prefix: &str) -> Option<Vec<f32>> {
        let mut flat = vec![0.0; self.layout.total];
        for (name, shape, offset) in &self.layout.names {
            let t = named.get(&format!("{prefix}{name}"))?;
            let n: usize = shape.iter().product();
            if t.data.len() != n {
                return None;
            }
            flat[*offset..*offset + n].copy_from_slice(&t.data);
        }
        Some(flat)
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    fn p(&self, offset: usize, len: usize) -> &[f32] {
        &self.params[offset..offset + len]
    }

    /// `out = x · Wᵀ` (or `+=` when `accumulate`) for the `[out_dim, in_dim]` weight at `w`.
    fn linear(
        &self,
        out: &mut [f32],
        accumulate: bool,
        x: &[f32],
        w: usize,
        out_dim: usize,
        in_dim: usize,
    ) {
        let n = x.len() / in_dim;
        let weight = rows(self.p(w, out_dim * in_dim), out_dim, in_dim);
        matmul(out, accumulate, rows(x, n, in_dim), weight.t(), 1.0, true);
    }

    /// Backward of [`NativeModel::linear`] to its input: `dx = dy · W` (or `+=`).
    fn input_grad(
        &self,
        dx: &mut [f32],
        accumulate: bool,
        dy: &[f32],
        w: usize,
        out_dim: usize,
        in_dim: usize,
    ) {
        let n = dy.len() / out_dim;
        let weight = rows(self.p(w, out_dim * in_dim), out_dim, in_dim);
        matmul(dx, accumulate, rows(dy, n, out_dim), weight, 1.0, true);
    }

    fn check(&self, batch: &PackedBatch) -> Result<(), BatchError> {
        let n = batch.len();
        if batch.targets.len() != n
            || batch.bounds.first() != Some(&0)
            || batch.bounds.last() != Some(&n)
            || batch.bounds.windows(2).any(|w| w[0] > w[1])
        {
            return Err(BatchError::Bounds(n));
        }
        let vocab = self.config.vocab_size;
        if let Some(&t) = batch
            .inputs
            .iter()
            .chain(&batch.targets)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(BatchError::Token(t, vocab));
        }
        if let Some(w) = batch
            .bounds
            .windows(2)
            .find(|w| w[1] - w[0] > self.config.max_seq_len)
        {
            return Err(BatchError::TooLong(w[1] - w[0], self.config.max_seq_len));
        }
        Ok(())
    }

    /// The forward pass: per-position log-probabilities of the targets, entropies, and the tape
    /// for [`NativeModel::backward`].
    pub fn forward(&self, batch: &PackedBatch) -> Result<Forward, BatchError> {
        self.check(batch)?;
        let c = &self.config;
        let (n, d, f, v) = (batch.len(), c.d_model, c.d_ff, c.vocab_size);
        let eps = c.norm_eps as f32;
        let positions = batch.positions();

        let embed = self.p(self.layout.embed, v * d);
        let mut x = vec![0.0f32; n * d];
        x.par_chunks_mut(d)
            .zip(batch.inputs.par_iter())
            .for_each(|(row, &t)| row.copy_from_slice(&embed[t as usize * d..][..d]));

        let mut blocks = Vec::with_capacity(c.n_layers);
        for o in &self.layout.blocks {
            let (inv_rms1, xn1) = rms_forward(&x, self.p(o.attn_norm, d), d, eps);
            let project = |w: usize| {
                let mut out = vec![0.0; n * d];
                self.linear(&mut out, false, &xn1, w, d, d);
                out
            };
            let (q, k, vv) = (project(o.q), project(o.k), project(o.v));
            let q = self.split_heads(&q, &positions, true);
            let k = self.split_heads(&k, &positions, true);
            let vv = self.split_heads(&vv, &positions, false);
            let (att_heads, lse) = self.attention_forward(&q, &k, &vv, &batch.bounds);
            let att = self.merge_heads(&att_heads, &positions, false);
            let mut x_mid = x.clone();
            self.linear(&mut x_mid, true, &att, o.o, d, d);

            let (inv_rms2, xn2) = rms_forward(&x_mid, self.p(o.mlp_norm, d), d, eps);
            let mut gate = vec![0.0; n * f];
            let mut up = vec![0.0; n * f];
            self.linear(&mut gate, false, &xn2, o.gate, f, d);
            self.linear(&mut up, false, &xn2, o.up, f, d);
            let mut hidden = vec![0.0; n * f];
            hidden
                .par_chunks_mut(f)
                .zip(gate.par_chunks(f).zip(up.par_chunks(f)))
                .for_each(|(h, (g, u))| {
                    for j in 0..f {
                        h[j] = silu(g[j]) * u[j];
                    }
                });
            let mut x_next = x_mid.clone();
            self.linear(&mut x_next, true, &hidden, o.down, d, f);
            blocks.push(BlockTape {
                x: std::mem::replace(&mut x, x_next),
                inv_rms1,
                xn1,
                q,
                k,
                v: vv,
                lse,
                att,
                x_mid,
                inv_rms2,
                xn2,
                gate,
                up,
                hidden,
            });
        }

        let (inv_rms_final, xn_final) = rms_forward(&x, self.p(self.layout.norm, d), d, eps);
        let mut probs = vec![0.0; n * v];
        self.linear(&mut probs, false, &xn_final, self.layout.head, v, d);
        let mut logprobs = vec![0.0; n];
        let mut entropy = vec![0.0; n];
        probs
            .par_chunks_mut(v)
            .zip(logprobs.par_iter_mut().zip(entropy.par_iter_mut()))
            .zip(batch.targets.par_iter())
            .for_each(|((row, (lp, ent)), &t)| {
                let max = max_of(row);
                let sum = sum_exp_shifted(row, max);
                let lse = max + sum.ln();
                *lp = row[t as usize] - lse;
                let mut h = 0.0;
                for z in row.iter_mut() {
                    let logp = *z - lse;
                    *z = exp(logp);
                    h -= *z * logp;
                }
                *ent = h;
            });
        Ok(Forward {
            logprobs,
            entropy,
            blocks,
            x_final: x,
            inv_rms_final,
            xn_final,
            probs,
            batch: batch.clone(),
            positions,
        })
    }

    /// Adds to `grads` (flat, parameter layout) the gradient of a loss whose derivative with
    /// respect to each position's `log p(target)` is `dlogp` (SFT: `−weight`).
    pub fn backward(&self, fwd: Forward, dlogp: &[f32], grads: &mut [f32]) {
        let c = &self.config;
        let (n, d, f, v) = (fwd.batch.len(), c.d_model, c.d_ff, c.vocab_size);
        assert_eq!(dlogp.len(), n, "one derivative per packed position");
        assert_eq!(grads.len(), self.layout.total, "gradient of parameter size");

        // d logp_t / d logit_j = [j = t] − p_j.
        let mut dlogits = fwd.probs;
        dlogits
            .par_chunks_mut(v)
            .zip(dlogp.par_iter().zip(fwd.batch.targets.par_iter()))
            .for_each(|(row, (&g, &t))| {
                for p in row.iter_mut() {
                    *p *= -g;
                }
                row[t as usize] += g;
            });
        weight_grad(grads, self.layout.head, &dlogits, &fwd.xn_final, v, d);
        let mut dxn = vec![0.0; n * d];
        self.input_grad(&mut dxn, false, &dlogits, self.layout.head, v, d);
        drop(dlogits);
        let mut dx = vec![0.0; n * d];
        rms_backward(
            &fwd.x_final,
            &fwd.inv_rms_final,
            self.p(self.layout.norm, d),
            &dxn,
            d,
            &mut dx,
            &mut grads[self.layout.norm..][..d],
        );

        for (o, t) in self.layout.blocks.iter().zip(fwd.blocks).rev() {
            // MLP branch: x_next = x_mid + down(silu(gate) · up).
            let mut d_hidden = vec![0.0; n * f];
            weight_grad(grads, o.down, &dx, &t.hidden, d, f);
            self.input_grad(&mut d_hidden, false, &dx, o.down, d, f);
            drop(t.hidden);
            let mut d_gate = t.gate;
            let mut d_up = t.up;
            d_gate
                .par_chunks_mut(f)
                .zip(d_up.par_chunks_mut(f))
                .zip(d_hidden.par_chunks(f))
                .for_each(|((g, u), dh)| {
                    for j in 0..f {
                        let s = sigmoid(g[j]);
                        let a = g[j];
                        g[j] = dh[j] * u[j] * s * (1.0 + a * (1.0 - s));
                        u[j] = dh[j] * a * s;
                    }
                });
            weight_grad(grads, o.gate, &d_gate, &t.xn2, f, d);
            weight_grad(grads, o.up, &d_up, &t.xn2, f, d);
            let mut dxn2 = vec![0.0; n * d];
            self.input_grad(&mut dxn2, false, &d_gate, o.gate, f, d);
            self.input_grad(&mut dxn2, true, &d_up, o.up, f, d);
            rms_backward(
                &t.x_mid,
                &t.inv_rms2,
                self.p(o.mlp_norm, d),
                &dxn2,
                d,
                &mut dx,
                &mut grads[o.mlp_norm..][..d],
            );

            // Attention branch: x_mid = x + o_proj(attention(q, k, v)).
            weight_grad(grads, o.o, &dx, &t.att, d, d);
            let mut d_att = vec![0.0; n * d];
            self.input_grad(&mut d_att, false, &dx, o.o, d, d);
            let d_att = self.split_heads(&d_att, &fwd.positions, false);
            let att = self.split_heads(&t.att, &fwd.positions, false);
            let (dq, dk, dv) =
                self.attention_backward(&t.q, &t.k, &t.v, &att, &d_att, &t.lse, &fwd.batch.bounds);
            let dq = self.merge_heads(&dq, &fwd.positions, true);
            let dk = self.merge_heads(&dk, &fwd.positions, true);
            let dv = self.merge_heads(&dv, &fwd.positions, false);
            let mut dxn1 = vec![0.0; n * d];
            for (w, dy) in [(o.q, &dq), (o.k, &dk), (o.v, &dv)] {
                weight_grad(grads, w, dy, &t.xn1, d, d);
                self.input_grad(&mut dxn1, true, dy, w, d, d);
            }
            rms_backward(
                &t.x,
                &t.inv_rms1,
                self.p(o.attn_norm, d),
                &dxn1,
                d,
                &mut dx,
                &mut grads[o.attn_norm..][..d],
            );
        }

        // Embedding rows, in position order (a fixed summation order).
        let ge = &mut grads[self.layout.embed..][..v * d];
        for (row, &tok) in dx.chunks(d).zip(&fwd.batch.inputs) {
            for (g, x) in ge[tok as usize * d..][..d].iter_mut().zip(row) {
                *g += x;
            }
        }
    }

    /// `[n, d]` rows → head-major `[h, n, hd]`, rotating by RoPE at each row's position.
    fn split_heads(&self, x: &[f32], positions: &[usize], rope: bool) -> Vec<f32> {
        let (d, h) = (self.config.d_model, self.config.n_heads);
        let (hd, n) = (d / h, positions.len());
        let half = hd / 2;
        let mut out = vec![0.0; n * d];
        out.par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(head, plane)| {
                for (i, (dst, &p)) in plane.chunks_mut(hd).zip(positions).enumerate() {
                    let src = &x[i * d + head * hd..][..hd];
                    if rope {
                        let (cos, sin) =
                            (&self.cos[p * half..][..half], &self.sin[p * half..][..half]);
                        for j in 0..half {
                            let (a, b) = (src[j], src[j + half]);
                            dst[j] = a * cos[j] - b * sin[j];
                            dst[j + half] = b * cos[j] + a * sin[j];
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            });
        out
    }

    /// Head-major `[h, n, hd]` → `[n, d]` rows; with `rope`, applies the transposed rotation
    /// (the backward pass of [`NativeModel::split_heads`]).
    fn merge_heads(&self, x: &[f32], positions: &[usize], rope: bool) -> Vec<f32> {
        let (d, h) = (self.config.d_model, self.config.n_heads);
        let (hd, n) = (d / h, positions.len());
        let half = hd / 2;
        let mut out = vec![0.0; n * d];
        out.par_chunks_mut(d)
            .zip(positions.par_iter())
            .enumerate()
            .for_each(|(i, (row, &p))| {
                for head in 0..h {
                    let src = &x[head * n * hd + i * hd..][..hd];
                    let dst = &mut row[head * hd..][..hd];
                    if rope {
                        let (cos, sin) =
                            (&self.cos[p * half..][..half], &self.sin[p * half..][..half]);
                        for j in 0..half {
                            let (a, b) = (src[j], src[j + half]);
                            dst[j] = a * cos[j] + b * sin[j];
                            dst[j + half] = b * cos[j] - a * sin[j];
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            });
        out
    }

    /// Causal attention of every (head, sequence): output `[h, n, hd]` and row log-sum-exps.
    fn attention_forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bounds: &[usize],
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.config.head_dim();
        let n = *bounds.last().unwrap_or(&0);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; self.config.n_heads * n];
        out.par_chunks_mut(n * hd)
            .zip(lse.par_chunks_mut(n))
            .enumerate()
            .for_each(|(head, (o_plane, l_plane))| {
                let units: Vec<_> = split_rows(o_plane, bounds, hd)
                    .into_iter()
                    .zip(split_rows(l_plane, bounds, 1))
                    .zip(bounds.windows(2))
                    .collect();
                units.into_par_iter().for_each(|((o, l), w)| {
                    let base = head * n * hd + w[0] * hd;
                    let len = (w[1] - w[0]) * hd;
                    let unit = Unit {
                        q: window(q, base, len),
                        k: window(k, base, len),
                        v: window(v, base, len),
                        hd,
                    };
                    unit.forward(o, l);
                });
            });
        (out, lse)
    }

    /// Gradients of causal attention for every (head, sequence), probabilities recomputed from
    /// the saved log-sum-exps. All tensors head-major.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        d_o: &[f32],
        lse: &[f32],
        bounds: &[usize],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let hd = self.config.head_dim();
        let n = *bounds.last().unwrap_or(&0);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; q.len()];
        let mut dv = vec![0.0; q.len()];
        dq.par_chunks_mut(n * hd)
            .zip(dk.par_chunks_mut(n * hd))
            .zip(dv.par_chunks_mut(n * hd))
            .enumerate()
            .for_each(|(head, ((dq_plane, dk_plane), dv_plane))| {
                let units: Vec<_> = split_rows(dq_plane, bounds, hd)
                    .into_iter()
                    .zip(split_rows(dk_plane, bounds, hd))
                    .zip(split_rows(dv_plane, bounds, hd))
                    .zip(bounds.windows(2))
                    .collect();
                units.into_par_iter().for_each(|(((dq, dk), dv), w)| {
                    let base = head * n * hd + w[0] * hd;
                    let len = (w[1] - w[0]) * hd;
                    let unit = Unit {
                        q: window(q, base, len),
                        k: window(k, base, len),
                        v: window(v, base, len),
                        hd,
                    };
                    let grads = UnitGrads { dq, dk, dv };
                    let lse = window(lse, head * n + w[0], w[1] - w[0]);
                    unit.backward(window(o, base, len), window(d_o, base, len), lse, grads);
                });
            });
        (dq, dk, dv)
    }
}

/// Query rows handled together: each block attends only to the keys up to its last row, so the
/// masked half of the score matrix is (mostly) never computed.
const QUERY_BLOCK: usize = 64;

/// One head of one sequence: `[t, hd]` queries, keys and values.
struct Unit<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    hd: usize,
}

/// Where [`Unit::backward`] writes (`dk`, `dv` accumulate over query blocks; all start at 0).
struct UnitGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl Unit<'_> {
    fn len(&self) -> usize {
        self.q.len() / self.hd
    }

    /// Probabilities of query rows `i0..i1` over keys `0..i1` (`[i1 − i0, i1]`): softmax of the
    /// scaled scores, from the row log-sum-exps when given, else computing them into `lse`.
    fn probs(&self, i0: usize, i1: usize, lse: Result<&[f32], &mut [f32]>) -> Vec<f32> {
        let hd = self.hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut p = vec![0.0; (i1 - i0) * i1];
        let queries = rows(&self.q[i0 * hd..i1 * hd], i1 - i0, hd);
        matmul(
            &mut p,
            false,
            queries,
            rows(&self.k[..i1 * hd], i1, hd).t(),
            scale,
            false,
        );
        let mut lse = lse;
        for (r, row) in p.chunks_mut(i1).enumerate() {
            let visible = i0 + r + 1;
            match &mut lse {
                Ok(saved) => {
                    let log_norm = saved[i0 + r];
                    for z in &mut row[..visible] {
                        *z = exp(*z - log_norm);
                    }
                }
                Err(out) => out[i0 + r] = softmax_in_place(&mut row[..visible]),
            }
            row[visible..].fill(0.0);
        }
        p
    }

    /// `out = softmax(q kᵀ / √hd, causal) v` and the row log-sum-exps.
    fn forward(&self, out: &mut [f32], lse: &mut [f32]) {
        let (t, hd) = (self.len(), self.hd);
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let p = self.probs(i0, i1, Err(&mut *lse));
            let values = rows(&self.v[..i1 * hd], i1, hd);
            matmul(
                &mut out[i0 * hd..i1 * hd],
                false,
                rows(&p, i1 - i0, i1),
                values,
                1.0,
                false,
            );
        }
    }

    /// Gradients given the output `o`, its gradient `d_o` and the saved log-sum-exps.
    fn backward(&self, o: &[f32], d_o: &[f32], lse: &[f32], g: UnitGrads) {
        let (t, hd) = (self.len(), self.hd);
        let scale = 1.0 / (hd as f32).sqrt();
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let b = i1 - i0;
            let p = self.probs(i0, i1, Ok(lse));
            let d_out = rows(&d_o[i0 * hd..i1 * hd], b, hd);
            matmul(
                &mut g.dv[..i1 * hd],
                true,
                rows(&p, b, i1).t(),
                d_out,
                1.0,
                false,
            );
            let mut ds = vec![0.0; b * i1];
            matmul(
                &mut ds,
                false,
                d_out,
                rows(&self.v[..i1 * hd], i1, hd).t(),
                1.0,
                false,
            );
            for (r, (drow, prow)) in ds.chunks_mut(i1).zip(p.chunks(i1)).enumerate() {
                let i = i0 + r;
                let delta = dot(&d_o[i * hd..][..hd], &o[i * hd..][..hd]);
                for (dz, &pz) in drow.iter_mut().zip(prow) {
                    *dz = pz * (*dz - delta);
                }
            }
            let keys = rows(&self.k[..i1 * hd], i1, hd);
            matmul(
                &mut g.dq[i0 * hd..i1 * hd],
                false,
                rows(&ds, b, i1),
                keys,
                scale,
                false,
            );
            let queries = rows(&self.q[i0 * hd..i1 * hd], b, hd);
            matmul(
                &mut g.dk[..i1 * hd],
                true,
                rows(&ds, b, i1).t(),
                queries,
                scale,
                false,
            );
        }
    }
}

/// `len` values from `start`.
fn window(m: &[f32], start: usize, len: usize) -> &[f32] {
    &m[start..start + len]
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `eˣ` in f32 without a libm call, so that loops over it vectorise (libm's `expf` was an eighth
/// of a training step, one scalar call per attention score). `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 Taylor polynomial for `eʳ` (relative error below 3·10⁻⁷), and
/// `2ⁿ` built from its exponent bits. Inputs are clamped to `[−87.3, 88]` (results stay
/// normal); NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Partial results kept per reduction. The compiler may not reassociate f32 sums or maxima, so
/// a plain `.sum()` adds one element at a time (and a scalar `exp` with it); eight independent
/// partials vectorise. The order is fixed, so results stay deterministic.
const LANES: usize = 8;

/// Folds `f(x)` of every element into [`LANES`] partials with the associative `combine`, then
/// combines the partials in order.
#[inline(always)]
fn reduce_lanes(
    xs: &[f32],
    init: f32,
    f: impl Fn(f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = combine(*a, f(x));
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a = combine(*a, f(x));
    }
    acc.into_iter().fold(init, combine)
}

/// The largest element (`−∞` for none; NaN elements are skipped, as by `f32::max`).
fn max_of(xs: &[f32]) -> f32 {
    reduce_lanes(xs, f32::NEG_INFINITY, |x| x, f32::max)
}

/// `Σ exp(z − shift)`.
fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
    reduce_lanes(xs, 0.0, |z| exp(z - shift), |a, b| a + b)
}

/// In place, the softmax of `row`; returns its log-sum-exp.
fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = max_of(row);
    for z in row.iter_mut() {
        *z = exp(*z - max);
    }
    let sum = reduce_lanes(row, 0.0, |z| z, |a, b| a + b);
    let inv = 1.0 / sum;
    for z in row.iter_mut() {
        *z *= inv;
    }
    max + sum.ln()
}

/// Backward of [`NativeModel::linear`] to its weight: `grads[w] += dyᵀ · x`.
fn weight_grad(grads: &mut [f32], w: usize, dy: &[f32], x: &[f32], out_dim: usize, in_dim: usize) {
    let n = x.len() / in_dim;
    matmul(
        &mut grads[w..][..out_dim * in_dim],
        true,
        rows(dy, n, out_dim).t(),
        rows(x, n, in_dim),
        1.0,
        true,
    );
}

/// Splits a `[n, width]` buffer into the rows of each sequence.
fn split_rows<'a>(mut buf: &'a mut [f32], bounds: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(bounds.len().saturating_sub(1));
    for w in bounds.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// RMSNorm of every row: `(1 / rms, x / rms · w)`.
fn rms_forward(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / d;
    let mut inv = vec![0.0; n];
    let mut y = vec![0.0; n * d];
    y.par_chunks_mut(d)
        .zip(inv.par_iter_mut())
        .zip(x.par_chunks(d))
        .for_each(|((y, r), x)| {
            let ms = dot(x, x) / d as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for j in 0..d {
                y[j] = x[j] * *r * w[j];
            }
        });
    (inv, y)
}

/// Backward of RMSNorm: adds `dx` into `dx_acc` and the weight gradient into `gw`.
fn rms_backward(
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    dy: &[f32],
    d: usize,
    dx_acc: &mut [f32],
    gw: &mut [f32],
) {
    dx_acc
        .par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .zip(inv.par_iter())
        .for_each(|((dx, (x, dy)), &r)| {
            let weighted: f32 = (0..d).map(|j| dy[j] * w[j] * x[j]).sum();
            let c = r * r * r * weighted / d as f32;
            for j in 0..d {
                dx[j] += r * w[j] * dy[j] - x[j] * c;
            }
        });
    // Weight gradient: partial sums over fixed blocks of rows, added in block order.
    const BLOCK: usize = 64;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(BLOCK * d)
        .zip(dy.par_chunks(BLOCK * d))
        .zip(inv.par_chunks(BLOCK))
        .map(|((x, dy), inv)| {
            let mut acc = vec![0.0; d];
            for ((x, dy), &r) in x.chunks(d).zip(dy.chunks(d)).zip(inv) {
                for j in 0..d {
                    acc[j] += dy[j] * x[j] * r;
                }
            }
            acc
        })
        .collect();
    for part in partials {
        for (g, p) in gw.iter_mut().zip(part) {
            *g += p;
        }
    }
}

/// A strided matrix view.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A row-major `rows × cols` view.
fn rows(data: &[f32], rows: usize, cols: usize) -> Mat<'_> {
    Mat {
        data,
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

impl Mat<'_> {
    /// The transposed view (no copy).
    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `out = scale · a · b`, or `out += scale · a · b` when `accumulate`; `out` is row-major.
/// `parallel` lets gemm use the rayon pool (off inside per-head work that is already parallel).
fn matmul(out: &mut [f32], accumulate: bool, a: Mat, b: Mat, scale: f32, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && out.len() == m * n && a.fits() && b.fits(),
        "matmul shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let parallelism = if parallel {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and
    // `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Makes the process keep freed buffers in its heap; binaries that train or decode with the
/// native model call it once at start (it is process-wide, so the library never does).
///
/// A training step allocates and frees tens of megabytes of activations; with glibc's defaults
/// those blocks go back to the kernel, and every step pays page faults and zeroing for fresh
/// pages again (SFT at 2,048-token batches: ≈7.3k → 8.5k tokens/s with this). A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator thresholds; glibc serialises it with allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// A slot pool over a [`NativeModel`]: the CPU counterpart of [`crate::Engine`], implementing the
/// same [`BatchedDecoder`] contract (same sampler, same per-thread seeding).
///
/// Keys and values live in per-slot vectors that grow with the tokens a slot holds; `truncate`
/// and `release` shrink them. Memory therefore follows live tokens, not `slots × context`.
#[derive(Debug)]
pub struct NativeEngine {
    model: NativeModel,
    /// `cache[slot][layer]` = (keys, values), each `[len, d]` rows, keys after RoPE.
    cache: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    lens: Vec<usize>,
    max_len: usize,
    prefilled_tokens: u64,
    decoded_tokens: u64,
}

impl NativeEngine {
    /// `slots` slots of up to `max_len` tokens each (at most the model's `max_seq_len`).
    pub fn new(model: NativeModel, slots: usize, max_len: usize) -> Self {
        let max_len = max_len.min(model.config.max_seq_len).max(1);
        let layers = model.config.n_layers;
        NativeEngine {
            cache: (0..slots)
                .map(|_| vec![(Vec::new(), Vec::new()); layers])
                .collect(),
            lens: vec![0; slots],
            max_len,
            model,
            prefilled_tokens: 0,
            decoded_tokens: 0,
        }
    }

    /// Tokens appended in multi-token (prefill) rows, and in one-token (decode) rows, so far.
    pub fn token_counts(&self) -> (u64, u64) {
        (self.prefilled_tokens, self.decoded_tokens)
    }

    /// Logits after appending each input's tokens (no sampling), one row per input.
    pub fn step_logits(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, DecoderError> {
        let v = self.model.config.vocab_size;
        let logits = self.forward(inputs)?;
        Ok(logits.chunks(v).map(<[f32]>::to_vec).collect())
    }

    /// Appends every input's tokens and returns the last position's logits per input, `[b, v]`.
    fn forward(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<f32>, DecoderError> {
        check_step(inputs, &self.lens, self.max_len)?;
        let c = &self.model.config;
        let (d, f, v, heads) = (c.d_model, c.d_ff, c.vocab_size, c.n_heads);
        let (hd, eps) = (d / heads, c.norm_eps as f32);
        let half = hd / 2;
        let mut bounds = vec![0];
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for input in inputs {
            let start = self.lens[input.slot];
            tokens.extend_from_slice(input.tokens);
            positions.extend(start..start + input.tokens.len());
            bounds.push(tokens.len());
            if input.tokens.len() > 1 {
                self.prefilled_tokens += input.tokens.len() as u64;
            } else {
                self.decoded_tokens += 1;
            }
        }
        let n = tokens.len();
        let model = &self.model;
        let embed = model.p(model.layout.embed, v * d);
        let mut x = vec![0.0f32; n * d];
        x.par_chunks_mut(d)
            .zip(tokens.par_iter())
            .for_each(|(row, &t)| row.copy_from_slice(&embed[t as usize * d..][..d]));
        let rope = |m: &mut [f32]| {
            m.par_chunks_mut(d)
                .zip(positions.par_iter())
                .for_each(|(row, &p)| {
                    let (cos, sin) = (
                        &model.cos[p * half..][..half],
                        &model.sin[p * half..][..half],
                    );
                    for head in row.chunks_mut(hd) {
                        for j in 0..half {
                            let (a, b) = (head[j], head[j + half]);
                            head[j] = a * cos[j] - b * sin[j];
                            head[j + half] = b * cos[j] + a * sin[j];
                        }
                    }
                })
        };
        for (layer, o) in model.layout.blocks.iter().enumerate() {
            let (_, xn) = rms_forward(&x, model.p(o.attn_norm, d), d, eps);
            let project = |w: usize| {
                let mut out = vec![0.0; n * d];
                invariant::linear(&mut out, false, &xn, model.p(w, d * d), d, d);
                out
            };
            let (mut q, mut k, vv) = (project(o.q), project(o.k), project(o.v));
            rope(&mut q);
            rope(&mut k);
            for (input, w) in inputs.iter().zip(bounds.windows(2)) {
                let (keys, values) = &mut self.cache[input.slot][layer];
                keys.extend_from_slice(&k[w[0] * d..w[1] * d]);
                values.extend_from_slice(&vv[w[0] * d..w[1] * d]);
            }
            let mut att = vec![0.0; n * d];
            let cache = &self.cache;
            let lens = &self.lens;
            split_rows(&mut att, &bounds, d)
                .into_par_iter()
                .zip(inputs.par_iter().zip(bounds.par_windows(2)))
                .for_each(|(out, (input, w))| {
                    let (keys, values) = &cache[input.slot][layer];
                    let q = &q[w[0] * d..w[1] * d];
                    let softmax = |row: &mut [f32]| {
                        softmax_in_place(row);
                    };
                    invariant::attend(out, q, keys, values, lens[input.slot], d, heads, softmax);
                });
            invariant::linear(&mut x, true, &att, model.p(o.o, d * d), d, d);
            let (_, xn2) = rms_forward(&x, model.p(o.mlp_norm, d), d, eps);
            let mut gate = vec![0.0; n * f];
            let mut up = vec![0.0; n * f];
            invariant::linear(&mut gate, false, &xn2, model.p(o.gate, f * d), f, d);
            invariant::linear(&mut up, false, &xn2, model.p(o.up, f * d), f, d);
            gate.par_chunks_mut(f)
                .zip(up.par_chunks(f))
                .for_each(|(g, u)| {
                    for j in 0..f {
                        g[j] = silu(g[j]) * u[j];
                    }
                });
            invariant::linear(&mut x, true, &gate, model.p(o.down, d * f), d, f);
        }
        for input in inputs {
            self.lens[input.slot] += input.tokens.len();
        }
        let last: Vec<f32> = bounds[1..]
            .iter()
            .flat_map(|&end| x[(end - 1) * d..end * d].iter().copied())
            .collect();
        let b = inputs.len();
        let (_, xn) = rms_forward(&last, model.p(model.layout.norm, d), d, eps);
        let mut logits = vec![0.0; b * v];
        invariant::linear(
            &mut logits,
            false,
            &xn,
            model.p(model.layout.head, v * d),
            v,
            d,
        );
        Ok(logits)
    }
}

impl BatchedDecoder for NativeEngine {
    fn slots(&self) -> usize {
        self.lens.len()
    }

    fn context_limit(&self) -> usize {
        self.max_len
    }

    fn slot_len(&self, slot: SlotId) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        let draws: Vec<f64> = inputs
            .iter()
            .map(|i| {
                let position = self.lens.get(i.slot).copied().unwrap_or(0) + i.tokens.len();
                uniform_at(i.seed, position)
            })
            .collect();
        let v = self.model.config.vocab_size;
        let logits = self.forward(inputs)?;
        Ok(logits
            .chunks(v)
            .zip(inputs.iter().zip(draws))
            .map(|(row, (input, u))| sample(row, input.sampling, u))
            .collect())
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        let current = self.lens.get_mut(slot).ok_or(DecoderError::BadSlot(slot))?;
        *current = (*current).min(len);
        let d = self.model.config.d_model;
        for (keys, values) in &mut self.cache[slot] {
            keys.truncate(*current * d);
            values.truncate(*current * d);
        }
        Ok(())
    }

    fn release(&mut self, slot: SlotId) {
        if let Some(len) = self.lens.get_mut(slot) {
            *len = 0;
            for (keys, values) in &mut self.cache[slot] {
                keys.clear();
                values.clear();
            }
        }
    }
}

/// One draw from a row of logits, the host twin of the device sampler in [`crate::engine`]:
/// greedy is the argmax; otherwise logits are divided by the temperature, sorted, cut by
/// top-k and top-p (a token stays while the mass before it is below p), and the token where the
/// cumulative kept mass first reaches `u × total` is taken. The log-probability is at τ = 1.
pub fn sample(logits: &[f32], sampling: Sampling, u: f64) -> Sampled {
    let v = logits.len();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    let token = if sampling.temperature <= 0.0 {
        logits.iter().position(|&z| z == max).unwrap_or(0)
    } else {
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let t = sampling.temperature;
        let top = logits[order[0]] / t;
        let weights: Vec<f32> = order.iter().map(|&i| (logits[i] / t - top).exp()).collect();
        let sum: f32 = weights.iter().sum();
        let k = if sampling.top_k == 0 {
            v
        } else {
            sampling.top_k
        };
        let p = if sampling.top_p > 0.0 && sampling.top_p < 1.0 {
            sampling.top_p
        } else {
            2.0
        };
        let mut before = 0.0;
        let mut cdf = Vec::with_capacity(v);
        let mut kept_total = 0.0;
        for (rank, w) in weights.iter().enumerate() {
            let prob = w / sum;
            if rank < k && before < p {
                kept_total += prob;
            }
            before += prob;
            cdf.push(kept_total);
        }
        let threshold = u as f32 * kept_total;
        let pick = cdf.iter().filter(|&&c| c < threshold).count().min(v - 1);
        order[pick]
    };
    Sampled {
        token: token as u32,
        logprob: logits[token] - lse,
    }
}

#[cfg(test)]
mod tests {
    use super::{dot, exp, max_of, softmax_in_place, sum_exp_shifted};

    #[test]
    fn lane_reductions_match_plain_ones_at_every_tail_length() {
        for len in 0..40 {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
                .collect();
            let ys: Vec<f32> = (0..len).map(|i| (i as f32).sin()).collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&xs), want_max, "max, length {len}");
            let want_dot: f64 = xs.iter().zip(&ys).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (dot(&xs, &ys) as f64 - want_dot).abs() < 1e-5,
                "dot, length {len}"
            );
            let want_sum: f64 = xs.iter().map(|&z| ((z - 1.0) as f64).exp()).sum();
            let got_sum = sum_exp_shifted(&xs, 1.0) as f64;
            assert!(
                (got_sum - want_sum).abs() < 1e-5 * want_sum.max(1.0),
                "sum, length {len}"
            );
            if len > 0 {
                let mut row = xs.clone();
                let lse = softmax_in_place(&mut row) as f64;
                let want_lse = want_max as f64 + (sum_exp_shifted(&xs, want_max) as f64).ln();
                assert!((lse - want_lse).abs() < 1e-5, "lse, length {len}");
                let total: f32 = row.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "softmax sums to {total}");
                for (p, z) in row.iter().zip(&xs) {
                    assert!((*p as f64 - (*z as f64 - lse).exp()).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(f32::NEG_INFINITY) >= 0.0);
        assert!(exp(f32::INFINITY).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }
}
