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

use apr_core::decoder::{
    uniform_at, BatchedDecoder, DecoderError, Sampled, Sampling, SlotId, StepInput,
};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::model::{CachedBatch, KvCache, Model};

/// Keys are attended over a multiple of this many positions, so the number of distinct shapes
/// (kernels to compile on GPU backends) stays small.
const KV_BUCKET: usize = 64;

/// A slot pool over a model.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    cache: KvCache,
    lens: Vec<usize>,
    max_len: usize,
    device: Device,
    pad: u32,
    prefilled_tokens: u64,
    decoded_tokens: u64,
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
            lens: vec![0; slots],
            max_len,
            device,
            pad,
            prefilled_tokens: 0,
            decoded_tokens: 0,
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Tokens appended in multi-token (prefill) rows, and in one-token (decode) rows, so far.
    pub fn token_counts(&self) -> (u64, u64) {
        (self.prefilled_tokens, self.decoded_tokens)
    }

    /// Logits after appending each input's tokens (no sampling): `[inputs, vocab]` on the host.
    pub fn step_logits(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, DecoderError> {
        let logits = self.forward(inputs)?;
        let [b, v] = logits.dims();
        let data = to_f32(logits);
        Ok((0..b).map(|r| data[r * v..(r + 1) * v].to_vec()).collect())
    }

    fn forward(&mut self, inputs: &[StepInput<'_>]) -> Result<Tensor<2>, DecoderError> {
        let b = inputs.len();
        check_step(inputs, &self.lens, self.max_len)?;
        let l = inputs.iter().map(|i| i.tokens.len()).max().unwrap_or(1);
        let mut tokens = Vec::with_capacity(b * l);
        let mut positions = Vec::with_capacity(b * l);
        for input in inputs {
            let start = self.lens[input.slot];
            let n = input.tokens.len();
            for i in 0..l {
                tokens.push(input.tokens.get(i).copied().unwrap_or(self.pad) as i64);
                // Padding rows repeat the last real position: valid for RoPE, never written.
                positions.push((start + i.min(n - 1)) as i64);
            }
            if n > 1 {
                self.prefilled_tokens += n as u64;
            } else {
                self.decoded_tokens += 1;
            }
        }
        let end = inputs
            .iter()
            .map(|i| self.lens[i.slot] + i.tokens.len())
            .max()
            .unwrap_or(1);
        let batch = CachedBatch {
            slots: inputs.iter().map(|i| i.slot).collect(),
            starts: inputs.iter().map(|i| self.lens[i.slot]).collect(),
            lens: inputs.iter().map(|i| i.tokens.len()).collect(),
            kv_len: end
                .div_ceil(KV_BUCKET)
                .saturating_mul(KV_BUCKET)
                .min(self.max_len),
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
            self.model.config.n_heads,
        );
        for input in inputs {
            self.lens[input.slot] += input.tokens.len();
        }
        Ok(logits)
    }
}

/// Rejects a step that names a slot twice or out of range, appends nothing to a slot, or would
/// overflow a slot's context.
pub(crate) fn check_step(
    inputs: &[StepInput<'_>],
    lens: &[usize],
    max_len: usize,
) -> Result<(), DecoderError> {
    if inputs.is_empty() {
        return Err(DecoderError::Backend("empty step".into()));
    }
    let mut seen = vec![false; lens.len()];
    for input in inputs {
        let slot = input.slot;
        if slot >= lens.len() || std::mem::replace(&mut seen[slot], true) {
            return Err(DecoderError::BadSlot(slot));
        }
        if input.tokens.is_empty() {
            return Err(DecoderError::Backend(format!(
                "slot {slot}: no tokens to append"
            )));
        }
        let len = lens[slot] + input.tokens.len();
        if len > max_len {
            return Err(DecoderError::ContextFull {
                slot,
                len,
                limit: max_len,
            });
        }
    }
    Ok(())
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
        // The position of the token being sampled, per input, before the lengths move.
        let params: Vec<(Sampling, f64)> = inputs
            .iter()
            .map(|i| {
                let position = self.lens.get(i.slot).copied().unwrap_or(0) + i.tokens.len();
                (i.sampling, uniform_at(i.seed, position))
            })
            .collect();
        let logits = self.forward(inputs)?;
        Ok(sample(logits, &params, &self.device))
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        let current = self.lens.get_mut(slot).ok_or(DecoderError::BadSlot(slot))?;
        *current = (*current).min(len);
        Ok(())
    }

    fn release(&mut self, slot: SlotId) {
        if let Some(len) = self.lens.get_mut(slot) {
            *len = 0;
        }
    }
}
