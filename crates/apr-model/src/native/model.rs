//! The native model: the Llama of [`crate::model`] as one flat host parameter vector, its forward
//! pass over a [`PackedBatch`] with a tape, and the exact gradient by hand.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::attention;
use super::batch::{BatchError, PackedBatch};
use super::block::{block_forward, BlockActs, BlockOps};
use super::gemm::{matmul, product, rows};
use super::kernels;
use super::kernels::{
    exp, ln, max_of, rms_backward, rms_forward, rope_rotate, sum_exp_shifted, swiglu_backward,
    weight_grads, zeros,
};
use super::layout::Layout;
use crate::config::ModelConfig;
use crate::model::{HostTensor, Weights, WeightsError};

/// What the backward pass needs of one block.
struct BlockTape {
    acts: BlockActs,
    attn: AttentionTape,
}

/// What training attention keeps: head-major `[h, n, hd]` queries, keys (after RoPE) and values,
/// and the `[h, n]` log-sum-exp of every attention row.
struct AttentionTape {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lse: Vec<f32>,
}

/// Training's [`BlockOps`]: `gemm` projections, and flash attention over packed sequences.
struct TrainOps<'a> {
    model: &'a NativeModel,
    positions: &'a [usize],
    bounds: &'a [usize],
}

impl BlockOps for TrainOps<'_> {
    type Saved = AttentionTape;

    fn linear(&self, out: &mut [f32], accumulate: bool, x: &[f32], w: &[f32], in_dim: usize) {
        let weight = rows(w, w.len() / in_dim, in_dim);
        matmul(
            out,
            accumulate,
            rows(x, x.len() / in_dim, in_dim),
            weight.t(),
            true,
        );
    }

    fn project(&self, x: &[f32], w: &[f32], in_dim: usize) -> Vec<f32> {
        kernels::linear(x, w, in_dim)
    }

    fn attention(&mut self, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> (Vec<f32>, AttentionTape) {
        let m = self.model;
        let q = m.split_heads(&q, self.positions, true);
        let k = m.split_heads(&k, self.positions, true);
        let v = m.split_heads(&v, self.positions, false);
        let (heads, lse) = attention::forward(&q, &k, &v, self.bounds, m.config.head_dim());
        let att = m.merge_heads(&heads, self.positions, false);
        (att, AttentionTape { q, k, v, lse })
    }
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
    pub(super) layout: Layout,
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

    pub(super) fn p(&self, offset: usize, len: usize) -> &[f32] {
        &self.params[offset..offset + len]
    }

    /// `x · Wᵀ` for the `[out_dim, in_dim]` weight at `w`.
    fn linear(&self, x: &[f32], w: usize, out_dim: usize, in_dim: usize) -> Vec<f32> {
        kernels::linear(x, self.p(w, out_dim * in_dim), in_dim)
    }

    /// Backward of [`NativeModel::linear`] to its input: `dx = dy · W`.
    fn input_grad(&self, dy: &[f32], w: usize, out_dim: usize, in_dim: usize) -> Vec<f32> {
        let weight = rows(self.p(w, out_dim * in_dim), out_dim, in_dim);
        product(rows(dy, dy.len() / out_dim, out_dim), weight, true)
    }

    /// [`NativeModel::input_grad`] added into `dx`.
    fn add_input_grad(&self, dx: &mut [f32], dy: &[f32], w: usize, out_dim: usize, in_dim: usize) {
        let weight = rows(self.p(w, out_dim * in_dim), out_dim, in_dim);
        matmul(
            dx,
            true,
            rows(dy, dy.len() / out_dim, out_dim),
            weight,
            true,
        );
    }

    /// The forward pass: per-position log-probabilities of the targets, entropies, and the tape
    /// for [`NativeModel::backward`].
    pub fn forward(&self, batch: &PackedBatch) -> Result<Forward, BatchError> {
        batch.check(self.config.vocab_size, self.config.max_seq_len)?;
        let c = &self.config;
        let (n, d, v) = (batch.len(), c.d_model, c.vocab_size);
        let eps = c.norm_eps as f32;
        let positions = batch.positions();

        let embed = self.p(self.layout.embed, v * d);
        let mut x = zeros(n * d);
        x.par_chunks_mut(d)
            .zip(batch.inputs.par_iter())
            .for_each(|(row, &t)| row.copy_from_slice(&embed[t as usize * d..][..d]));

        let mut blocks = Vec::with_capacity(c.n_layers);
        let mut ops = TrainOps {
            model: self,
            positions: &positions,
            bounds: &batch.bounds,
        };
        for o in &self.layout.blocks {
            let (x_next, acts, attn) = block_forward(c, &self.params, o, x, &mut ops);
            blocks.push(BlockTape { acts, attn });
            x = x_next;
        }

        let (inv_rms_final, xn_final) = rms_forward(&x, self.p(self.layout.norm, d), d, eps);
        let mut probs = self.linear(&xn_final, self.layout.head, v, d);
        let mut logprobs = vec![0.0; n];
        let mut entropy = vec![0.0; n];
        probs
            .par_chunks_mut(v)
            .zip(logprobs.par_iter_mut().zip(entropy.par_iter_mut()))
            .zip(batch.targets.par_iter())
            .for_each(|((row, (lp, ent)), &t)| {
                let max = max_of(row);
                let sum = sum_exp_shifted(row, max);
                let lse = max + ln(sum);
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
        weight_grads(grads, &fwd.xn_final, d, &[(self.layout.head, &dlogits, v)]);
        let dxn = self.input_grad(&dlogits, self.layout.head, v, d);
        drop(dlogits);
        let mut dx = zeros(n * d);
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
            weight_grads(grads, &t.acts.hidden, f, &[(o.down, &dx, d)]);
            let d_hidden = self.input_grad(&dx, o.down, d, f);
            drop(t.acts.hidden);
            let mut d_gate = t.acts.gate;
            let mut d_up = t.acts.up;
            swiglu_backward(&mut d_gate, &mut d_up, &d_hidden, f);
            weight_grads(
                grads,
                &t.acts.xn2,
                d,
                &[(o.gate, &d_gate, f), (o.up, &d_up, f)],
            );
            let mut dxn2 = self.input_grad(&d_gate, o.gate, f, d);
            self.add_input_grad(&mut dxn2, &d_up, o.up, f, d);
            rms_backward(
                &t.acts.x_mid,
                &t.acts.inv_rms2,
                self.p(o.mlp_norm, d),
                &dxn2,
                d,
                &mut dx,
                &mut grads[o.mlp_norm..][..d],
            );

            // Attention branch: x_mid = x + o_proj(attention(q, k, v)).
            weight_grads(grads, &t.acts.att, d, &[(o.o, &dx, d)]);
            let d_att = self.input_grad(&dx, o.o, d, d);
            let d_att = self.split_heads(&d_att, &fwd.positions, false);
            let att = self.split_heads(&t.acts.att, &fwd.positions, false);
            let bounds = &fwd.batch.bounds;
            let (dq, dk, dv) = attention::backward(
                &t.attn.q,
                &t.attn.k,
                &t.attn.v,
                &att,
                &d_att,
                &t.attn.lse,
                bounds,
                c.head_dim(),
            );
            let dq = self.merge_heads(&dq, &fwd.positions, true);
            let dk = self.merge_heads(&dk, &fwd.positions, true);
            let dv = self.merge_heads(&dv, &fwd.positions, false);
            let mut dxn1 = self.input_grad(&dq, o.q, d, d);
            self.add_input_grad(&mut dxn1, &dk, o.k, d, d);
            self.add_input_grad(&mut dxn1, &dv, o.v, d, d);
            let qkv = [(o.q, &dq[..], d), (o.k, &dk[..], d), (o.v, &dv[..], d)];
            weight_grads(grads, &t.acts.xn1, d, &qkv);
            rms_backward(
                &t.acts.x,
                &t.acts.inv_rms1,
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

    /// The RoPE tables at one position, `[hd / 2]` each.
    pub(super) fn rope_at(&self, position: usize) -> (&[f32], &[f32]) {
        let half = self.config.head_dim() / 2;
        (
            &self.cos[position * half..][..half],
            &self.sin[position * half..][..half],
        )
    }

    /// `[n, d]` rows → head-major `[h, n, hd]`, rotating by RoPE at each row's position.
    fn split_heads(&self, x: &[f32], positions: &[usize], rope: bool) -> Vec<f32> {
        let (d, hd) = (self.config.d_model, self.config.head_dim());
        let n = positions.len();
        let mut out = zeros(n * d);
        out.par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(head, plane)| {
                for (i, (dst, &p)) in plane.chunks_mut(hd).zip(positions).enumerate() {
                    dst.copy_from_slice(&x[i * d + head * hd..][..hd]);
                    if rope {
                        let (cos, sin) = self.rope_at(p);
                        rope_rotate(dst, cos, sin, false);
                    }
                }
            });
        out
    }

    /// Head-major `[h, n, hd]` → `[n, d]` rows; with `rope`, applies the transposed rotation
    /// (the backward pass of [`NativeModel::split_heads`]).
    fn merge_heads(&self, x: &[f32], positions: &[usize], rope: bool) -> Vec<f32> {
        let (d, hd) = (self.config.d_model, self.config.head_dim());
        let n = positions.len();
        let mut out = zeros(n * d);
        out.par_chunks_mut(d)
            .zip(positions.par_iter())
            .enumerate()
            .for_each(|(i, (row, &p))| {
                for (head, dst) in row.chunks_mut(hd).enumerate() {
                    dst.copy_from_slice(&x[head * n * hd + i * hd..][..hd]);
                    if rope {
                        let (cos, sin) = self.rope_at(p);
                        rope_rotate(dst, cos, sin, true);
                    }
                }
            });
        out
    }
}
