//! The inference engine: a pool of slots, each with a KV cache, advanced in batched steps. It
//! implements [`apr_core::decoder::BatchedDecoder`], so the APR runtime drives it.
//!
//! * A step appends any number of tokens to several slots in one padded forward pass (prefill of
//!   prompts and join blocks) or one token to every active slot (decode).
//! * `truncate` keeps a KV prefix: at a join the parent keeps everything before its spawn block
//!   and only the join block is prefilled.
//! * Sampling happens on the device (greedy, temperature, top-k, top-p); one token id and one
//!   log-probability per slot come back, not the logits. The uniform behind slot `s`'s draw at
//!   position `p` is `uniform_at(seed_s, p)`: a thread's tokens do not depend on its batch.
//!
//! Memory: every slot owns a preallocated `[heads, max_len, head_dim]` key and value buffer per
//! layer (static shapes: the CubeCL backends compile one kernel set). That is
//! `slots × max_len` positions, the simple choice that fits the `tiny`/`small` presets
//! (64 slots × 2,048 × 192 × 4 layers × 2 × 4 B = 805 MB at `small`); for the `paper` preset
//! (302 MB per slot at 4,096 positions) a paged cache would be the next step.

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, Sampling, SlotId, StepInput};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::model::{CachedBatch, KvCache, Model};
use apr_core::SlotTable;

/// Keys are attended over a multiple of this many positions, so the number of distinct shapes
/// (kernels to compile on GPU backends) stays small.
const KV_BUCKET: usize = 64;

/// A slot pool over a model.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    cache: KvCache,
    slots: SlotTable,
    device: Device,
    pad: u32,
}

impl Engine {
    /// `slots` slots of up to `max_len` tokens each (at most the model's `max_seq_len`).
    pub fn new(model: Model, slots: usize, max_len: usize, pad: u32) -> Self {
        let max_len = max_len.min(model.config.max_seq_len).max(1);
        let device = model.rope_device();
        let cache = KvCache::new(&model.config, slots, max_len, &device);
        Engine {
            model,
            cache,
            slots: SlotTable::new(slots, max_len),
            device,
            pad,
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Tokens appended in multi-token (prefill) rows, and in one-token (decode) rows, so far.
    pub fn token_counts(&self) -> (u64, u64) {
        self.slots.token_counts()
    }

    /// Logits after appending each input's tokens (no sampling): `[inputs, vocab]` on the host.
    pub fn step_logits(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, DecoderError> {
        let logits = self.forward(inputs)?;
        let [b, v] = logits.dims();
        let data = to_f32(logits);
        Ok((0..b).map(|r| data[r * v..(r + 1) * v].to_vec()).collect())
    }

    fn forward(&mut self, inputs: &[StepInput<'_>]) -> Result<Tensor<2>, DecoderError> {
        self.slots.check(inputs)?;
        let b = inputs.len();
        let l = inputs.iter().map(|i| i.tokens.len()).max().unwrap_or(1);
        let starts: Vec<usize> = inputs.iter().map(|i| self.slots.slot_len(i.slot)).collect();
        let mut tokens = Vec::with_capacity(b * l);
        let mut positions = Vec::with_capacity(b * l);
        for (input, &start) in inputs.iter().zip(&starts) {
            let n = input.tokens.len();
            for i in 0..l {
                tokens.push(input.tokens.get(i).copied().unwrap_or(self.pad) as i64);
                // Padding rows repeat the last real position: valid for RoPE, never written.
                positions.push((start + i.min(n - 1)) as i64);
            }
        }
        let end = inputs
            .iter()
            .zip(&starts)
            .map(|(i, &start)| start + i.tokens.len())
            .max()
            .unwrap_or(1);
        let batch = CachedBatch {
            slots: inputs.iter().map(|i| i.slot).collect(),
            starts,
            lens: inputs.iter().map(|i| i.tokens.len()).collect(),
            kv_len: end
                .div_ceil(KV_BUCKET)
                .saturating_mul(KV_BUCKET)
                .min(self.slots.max_len()),
        };
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [b, l]), &self.device);
        let positions =
            Tensor::<2, Int>::from_data(TensorData::new(positions, [b, l]), &self.device);
        let logits = self.model.llama.forward_cached(
            tokens,
            positions,
            &batch,
            &mut self.cache,
            &self.model.rope,
        );
        self.slots.append(inputs);
        Ok(logits)
    }
}

/// The fastest decoder for a model: the hand-written [`crate::native::NativeEngine`] when the
/// model lives on the CPU backend, the burn [`Engine`] elsewhere.
pub fn engine_for(
    model: &Model,
    slots: usize,
    max_len: usize,
    pad: u32,
) -> Box<dyn BatchedDecoder> {
    if crate::backend::is_cpu(&model.rope_device()) {
        let weights = model.llama.to_weights();
        if let Ok(native) = crate::native::NativeModel::from_weights(&model.config, &weights) {
            return Box::new(crate::native::NativeEngine::new(native, slots, max_len));
        }
    }
    Box::new(Engine::new(model.clone(), slots, max_len, pad))
}

fn to_f32(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

fn to_i64(t: Tensor<2, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Samples one token per row on the device; returns ids and log-probabilities (τ = 1).
fn sample(logits: Tensor<2>, params: &[(Sampling, f64)], device: &Device) -> Vec<Sampled> {
    let [b, v] = logits.dims();
    let logp = log_softmax(logits.clone(), 1);
    let greedy = logits.clone().argmax(1);
    let all_greedy = params.iter().all(|(s, _)| s.temperature <= 0.0);
    let chosen = if all_greedy {
        greedy
    } else {
        let column = |f: &dyn Fn(&(Sampling, f64)) -> f32| {
            Tensor::<2>::from_data(
                TensorData::new(params.iter().map(f).collect::<Vec<f32>>(), [b, 1]),
                device,
            )
        };
        let temps = column(&|(s, _)| {
            if s.temperature > 0.0 {
                s.temperature
            } else {
                1.0
            }
        });
        let ks = column(&|(s, _)| {
            if s.top_k == 0 {
                v as f32
            } else {
                s.top_k as f32
            }
        });
        let ps = column(&|(s, _)| {
            if s.top_p > 0.0 && s.top_p < 1.0 {
                s.top_p
            } else {
                2.0
            }
        });
        let us = column(&|(_, u)| *u as f32);
        let (sorted, order) = (logits / temps).sort_descending_with_indices(1);
        let probs = softmax(sorted, 1);
        let before = probs.clone().cumsum(1) - probs.clone();
        let rank = Tensor::<1, Int>::arange(0..v as i64, device)
            .float()
            .reshape([1, v]);
        // Drop ranks past k and tokens once the mass before them reaches p.
        let drop = rank.greater_equal(ks).int() + before.greater_equal(ps).int();
        let kept = probs.mask_fill(drop.greater_elem(0), 0.0);
        let cdf = kept.cumsum(1);
        let total = cdf.clone().slice([0..b, v - 1..v]);
        let pick = cdf
            .lower(us * total)
            .int()
            .sum_dim(1)
            .clamp(0, v as i64 - 1);
        let sampled = order.gather(1, pick);
        let is_greedy = Tensor::<2, Int>::from_data(
            TensorData::new(
                params
                    .iter()
                    .map(|(s, _)| (s.temperature <= 0.0) as i64)
                    .collect::<Vec<_>>(),
                [b, 1],
            ),
            device,
        )
        .greater_elem(0);
        sampled.mask_where(is_greedy, greedy)
    };
    let lp = logp.gather(1, chosen.clone());
    let tokens = to_i64(chosen);
    let logprobs = to_f32(lp);
    tokens
        .into_iter()
        .zip(logprobs)
        .map(|(t, lp)| Sampled {
            token: t as u32,
            logprob: lp,
        })
        .collect()
}

impl BatchedDecoder for Engine {
    fn table(&self) -> &SlotTable {
        &self.slots
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        let draws = self.slots.draws(inputs);
        let logits = self.forward(inputs)?;
        let params: Vec<(Sampling, f64)> = inputs.iter().map(|i| i.sampling).zip(draws).collect();
        Ok(sample(logits, &params, &self.device))
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        self.slots.truncate(slot, len).map(drop)
    }

    fn release(&mut self, slot: SlotId) {
        self.slots.release(slot);
    }
}
