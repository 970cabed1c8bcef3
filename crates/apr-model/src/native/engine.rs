//! The native engine: a slot pool over a [`NativeModel`] on the host, the CPU counterpart of the
//! burn [`crate::Engine`] under the same [`BatchedDecoder`] contract (one [`SlotTable`], the same
//! sampler, the same per-thread seeding). Its kernels are batch-invariant
//! ([`crate::invariant`]): a slot's logits do not depend on what shares its step.

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, SlotId, StepInput};
use rayon::prelude::*;

use super::block::{block_forward, BlockOps};
use super::kernels::{rms_forward, rope_rotate, softmax_in_place, split_rows};
use super::model::NativeModel;
use super::sample::sample;
use crate::invariant;
use apr_core::SlotTable;

/// A slot pool over a [`NativeModel`].
///
/// Keys and values live in per-slot vectors that grow with the tokens a slot holds; `truncate`
/// and `release` shrink them. Memory therefore follows live tokens, not `slots × context`.
#[derive(Debug)]
pub struct NativeEngine {
    model: NativeModel,
    /// `cache[slot][layer]` = (keys, values), each `[len, d]` rows, keys after RoPE.
    cache: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    slots: SlotTable,
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
            slots: SlotTable::new(slots, max_len),
            model,
        }
    }

    /// Tokens appended in multi-token (prefill) rows, and in one-token (decode) rows, so far.
    pub fn token_counts(&self) -> (u64, u64) {
        self.slots.token_counts()
    }

    /// Logits after appending each input's tokens (no sampling), one row per input.
    pub fn step_logits(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, DecoderError> {
        let v = self.model.config.vocab_size;
        let logits = self.forward(inputs)?;
        Ok(logits.chunks(v).map(<[f32]>::to_vec).collect())
    }

    /// Appends every input's tokens and returns the last position's logits per input, `[b, v]`.
    fn forward(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<f32>, DecoderError> {
        self.slots.check(inputs)?;
        let model = &self.model;
        let c = &model.config;
        let (d, v, eps) = (c.d_model, c.vocab_size, c.norm_eps as f32);
        let starts: Vec<usize> = inputs.iter().map(|i| self.slots.slot_len(i.slot)).collect();
        let mut bounds = vec![0];
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for (input, &start) in inputs.iter().zip(&starts) {
            tokens.extend_from_slice(input.tokens);
            positions.extend(start..start + input.tokens.len());
            bounds.push(tokens.len());
        }
        let embed = model.p(model.layout.embed, v * d);
        let mut x = vec![0.0f32; tokens.len() * d];
        x.par_chunks_mut(d)
            .zip(tokens.par_iter())
            .for_each(|(row, &t)| row.copy_from_slice(&embed[t as usize * d..][..d]));
        let slots: Vec<SlotId> = inputs.iter().map(|i| i.slot).collect();
        for (layer, o) in model.layout.blocks.iter().enumerate() {
            let mut ops = CacheOps {
                model,
                positions: &positions,
                bounds: &bounds,
                slots: &slots,
                starts: &starts,
                cache: &mut self.cache,
                layer,
            };
            x = block_forward(c, &model.params, o, x, &mut ops).0;
        }
        self.slots.append(inputs);
        let last: Vec<f32> = bounds[1..]
            .iter()
            .flat_map(|&end| x[(end - 1) * d..end * d].iter().copied())
            .collect();
        let (_, xn) = rms_forward(&last, model.p(model.layout.norm, d), d, eps);
        let mut logits = vec![0.0; inputs.len() * v];
        let head = model.p(model.layout.head, v * d);
        invariant::linear(&mut logits, false, &xn, head, v, d);
        Ok(logits)
    }
}

/// The engine's [`BlockOps`] for one layer: batch-invariant projections, and attention of each
/// input's new rows over its slot's cached keys and values, which it extends.
struct CacheOps<'a> {
    model: &'a NativeModel,
    positions: &'a [usize],
    bounds: &'a [usize],
    slots: &'a [SlotId],
    /// Tokens each slot held before this step.
    starts: &'a [usize],
    cache: &'a mut [Vec<(Vec<f32>, Vec<f32>)>],
    layer: usize,
}

impl BlockOps for CacheOps<'_> {
    type Saved = ();

    fn linear(&self, out: &mut [f32], accumulate: bool, x: &[f32], w: &[f32], in_dim: usize) {
        invariant::linear(out, accumulate, x, w, w.len() / in_dim, in_dim);
    }

    fn attention(&mut self, mut q: Vec<f32>, mut k: Vec<f32>, v: Vec<f32>) -> (Vec<f32>, ()) {
        let c = &self.model.config;
        let (d, heads, hd) = (c.d_model, c.n_heads, c.head_dim());
        for m in [&mut q, &mut k] {
            m.par_chunks_mut(d)
                .zip(self.positions.par_iter())
                .for_each(|(row, &p)| {
                    let (cos, sin) = self.model.rope_at(p);
                    for head in row.chunks_mut(hd) {
                        rope_rotate(head, cos, sin, false);
                    }
                });
        }
        for (&slot, w) in self.slots.iter().zip(self.bounds.windows(2)) {
            let (keys, values) = &mut self.cache[slot][self.layer];
            keys.extend_from_slice(&k[w[0] * d..w[1] * d]);
            values.extend_from_slice(&v[w[0] * d..w[1] * d]);
        }
        let mut att = vec![0.0; q.len()];
        let (cache, layer) = (&*self.cache, self.layer);
        split_rows(&mut att, self.bounds, d)
            .into_par_iter()
            .zip(self.slots.par_iter().zip(self.bounds.par_windows(2)))
            .zip(self.starts.par_iter())
            .for_each(|((out, (&slot, w)), &start)| {
                let (keys, values) = &cache[slot][layer];
                let softmax = |row: &mut [f32]| {
                    softmax_in_place(row);
                };
                invariant::attend(
                    out,
                    &q[w[0] * d..w[1] * d],
                    keys,
                    values,
                    start,
                    d,
                    heads,
                    softmax,
                );
            });
        (att, ())
    }
}

impl BatchedDecoder for NativeEngine {
    fn table(&self) -> &SlotTable {
        &self.slots
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        let draws = self.slots.draws(inputs);
        let v = self.model.config.vocab_size;
        let logits = self.forward(inputs)?;
        Ok(logits
            .chunks(v)
            .zip(inputs.iter().zip(draws))
            .map(|(row, (input, u))| sample(row, input.sampling, u))
            .collect())
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        let kept = self.slots.truncate(slot, len)? * self.model.config.d_model;
        for (keys, values) in &mut self.cache[slot] {
            keys.truncate(kept);
            values.truncate(kept);
        }
        Ok(())
    }

    fn release(&mut self, slot: SlotId) {
        if self.slots.release(slot) {
            for (keys, values) in &mut self.cache[slot] {
                keys.clear();
                values.clear();
            }
        }
    }
}
