//! The inference engine: a pool of slots, each with a KV cache, advanced in batched steps. It
//! implements [`apr_core::decoder::BatchedDecoder`], so the APR runtime drives it.
//!
//! * A step appends any number of tokens to several slots in one padded forward pass (prefill of
//!   prompts and join blocks) or one token to every active slot (decode).
//! * `truncate` keeps a KV prefix: at a join the parent keeps everything before its spawn block
//!   and only the join block is prefilled.
//! * Sampling happens on the device (greedy, temperature, top-k, top-p, without a sort:
//!   [`crate::device_sample`]); one token id and one log-probability per slot come back, not the
//!   logits. The uniform behind slot `s`'s draw at position `p` is `uniform_at(seed_s, p)`: a
//!   thread's tokens do not depend on its batch.
//! * Decode steps take the [`DecodePath`] of the device: on CUDA a static step captured into a
//!   graph per shape ([`crate::static_step`]), elsewhere the dynamic path prefill takes.
//!
//! Memory: every slot owns a preallocated `[heads, max_len, head_dim]` key and value buffer per
//! layer (static shapes: the CubeCL backends compile one kernel set). That is
//! `slots × max_len` positions, the simple choice that fits the `tiny`/`small` presets
//! (64 slots × 2,048 × 192 × 4 layers × 2 × 4 B = 805 MB at `small`); for the `paper` preset
//! (302 MB per slot at 4,096 positions) a paged cache would be the next step.

use std::cell::RefCell;
use std::rc::Rc;

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, Sampling, SlotId, StepInput};
use apr_core::SlotTable;
use burn::tensor::{Device, Int, Tensor, TensorData, Transaction};

use crate::device_sample::{draw_table, f32_tensor, sample_rows, SamplerTables, DRAW_FIELDS};
use crate::model::{CachedBatch, KvCache, Model};
use crate::static_step::StaticSteps;
pub use crate::static_step::{DecodePath, GraphReport};

/// Keys are attended over a multiple of this many positions, so the number of distinct shapes
/// (kernels to compile on GPU backends) stays small.
const KV_BUCKET: usize = 64;

/// A slot pool over a model.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    /// Shared with the captured steps, which write it in place.
    cache: Rc<RefCell<KvCache>>,
    slots: SlotTable,
    device: Device,
    pad: u32,
    tables: SamplerTables,
    decode: StaticSteps,
}

impl Engine {
    /// `slots` slots of up to `max_len` tokens each (at most the model's `max_seq_len`).
    pub fn new(model: Model, slots: usize, max_len: usize, pad: u32) -> Self {
        let max_len = max_len.min(model.config.max_seq_len).max(1);
        let device = model.rope_device();
        let cache = KvCache::new(&model.config, slots, max_len, &device);
        let tables = SamplerTables::new(model.config.vocab_size, &device);
        let path = DecodePath::default_for(&device);
        Engine {
            decode: StaticSteps::new(path, tables.clone(), cache.stride(), &device),
            tables,
            cache: Rc::new(RefCell::new(cache)),
            model,
            slots: SlotTable::new(slots, max_len),
            device,
            pad,
        }
    }

    /// The same engine with decode steps on `path`.
    pub fn with_decode_path(mut self, path: DecodePath) -> Self {
        let stride = self.cache.borrow().stride();
        self.decode = StaticSteps::new(path, self.tables.clone(), stride, &self.device);
        self
    }

    /// How decode steps run.
    pub fn decode_path(&self) -> DecodePath {
        self.decode.path()
    }

    /// How the decode steps' captures went (all zero off [`DecodePath::Captured`]).
    pub fn graph_report(&self) -> GraphReport {
        self.decode.report()
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

    /// Samples one token per row of `logits` on the device and reads ids and log-probabilities
    /// back in one transaction.
    fn sample(
        &self,
        logits: Tensor<2>,
        params: &[(Sampling, f64)],
    ) -> Result<Vec<Sampled>, DecoderError> {
        let sampled = params.iter().any(|(s, _)| s.temperature > 0.0);
        let draws = sampled.then(|| {
            let table = draw_table(params, self.model.config.vocab_size);
            f32_tensor(table, [DRAW_FIELDS, params.len()], &self.device)
        });
        let (tokens, logprobs) = sample_rows(logits, draws.as_ref(), &self.tables);
        let data = Transaction::default()
            .register(tokens)
            .register(logprobs)
            .try_execute()
            .map_err(|e| DecoderError::Backend(format!("reading sampled tokens: {e:?}")))?;
        Ok(data[0]
            .iter::<i64>()
            .zip(data[1].iter::<f32>())
            .map(|(token, logprob)| Sampled {
                token: token as u32,
                logprob,
            })
            .collect())
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
            &mut self.cache.borrow_mut(),
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

impl BatchedDecoder for Engine {
    fn table(&self) -> &SlotTable {
        &self.slots
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        let draws = self.slots.draws(inputs);
        let decoding = !inputs.is_empty() && inputs.iter().all(|i| i.tokens.len() == 1);
        if decoding && self.decode.path() != DecodePath::Dynamic {
            self.slots.check(inputs)?;
            let (model, table) = (&self.model, &self.slots);
            let out = self
                .decode
                .decode(model, &self.cache, table, inputs, &draws, self.pad)?;
            self.slots.append(inputs);
            return Ok(out);
        }
        let logits = self.forward(inputs)?;
        let params: Vec<(Sampling, f64)> = inputs.iter().map(|i| i.sampling).zip(draws).collect();
        self.sample(logits, &params)
    }

    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        self.slots.truncate(slot, len).map(drop)
    }

    fn release(&mut self, slot: SlotId) {
        self.slots.release(slot);
    }
}

fn to_f32(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}
