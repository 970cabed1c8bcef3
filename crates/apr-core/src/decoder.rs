//! What the runtime asks of a language model: a pool of slots, each holding one thread's KV
//! state, advanced together in batched steps (the model-agnostic side of the engine).

use crate::slots::SlotTable;
use serde::{Deserialize, Serialize};

/// Index of a slot in a decoder's pool.
pub type SlotId = usize;

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 for greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: off).
    pub top_p: f32,
}

impl Sampling {
    /// Argmax decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// Plain sampling at a temperature.
    pub fn temperature(t: f32) -> Self {
        Sampling {
            temperature: t,
            ..Sampling::GREEDY
        }
    }
}

/// One slot's part of a batched step: append `tokens` to the slot, then sample the token after
/// them.
#[derive(Clone, Debug)]
pub struct StepInput<'a> {
    /// The slot.
    pub slot: SlotId,
    /// Tokens to append (a prompt or a join block when prefilling; the last sampled token when
    /// decoding). Must not be empty.
    pub tokens: &'a [u32],
    /// How to sample.
    pub sampling: Sampling,
    /// The thread's own seed: the draw for the token at position `p` depends only on
    /// `(seed, p)`, never on what else is in the batch.
    pub seed: u64,
}

impl<'a> StepInput<'a> {
    /// Greedy decoding of `tokens` appended to `slot` (no draw, so no seed).
    pub fn greedy(slot: SlotId, tokens: &'a [u32]) -> Self {
        StepInput {
            slot,
            tokens,
            sampling: Sampling::GREEDY,
            seed: 0,
        }
    }
}

/// A sampled token with its log-probability under the model's unscaled distribution (what a
/// policy-gradient trainer needs as the behaviour policy's log-probability at τ = 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    /// Token id.
    pub token: u32,
    /// `log p(token)` at temperature 1.
    pub logprob: f32,
}

/// Why a decoder step failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecoderError {
    /// The slot does not exist.
    #[error("slot {0} is out of range")]
    BadSlot(SlotId),
    /// Appending would exceed the slot's context.
    #[error("slot {slot}: {len} tokens would exceed the context of {limit}")]
    ContextFull {
        /// The slot.
        slot: SlotId,
        /// Length it would reach.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Anything the backend reports.
    #[error("decoder: {0}")]
    Backend(String),
}

/// How far a decoder that writes several tokens per step (a remote completions server) may go
/// for one input of [`BatchedDecoder::step_many`]. A hint: the runtime takes the tokens it can
/// use and discards the rest, so a decoder may stop earlier or later without changing results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    /// Most tokens the runtime can take from this step.
    pub max_tokens: usize,
    /// Strings after which the runtime stops taking tokens (it rewrites the text there).
    pub stop: &'static [&'static str],
    /// Inputs with the same affinity belong to one problem's thread tree: a decoder with several
    /// replicas sends them to the same one, so that its prefix cache serves the joins.
    pub affinity: u64,
}

/// A batched language model with per-slot state (KV caches).
pub trait BatchedDecoder {
    /// The lengths of the slots: every decoder keeps them in one [`SlotTable`], which checks
    /// what a step may append.
    fn table(&self) -> &SlotTable;
    /// Number of slots.
    fn slots(&self) -> usize {
        self.table().slots()
    }
    /// Most tokens a slot can hold.
    fn context_limit(&self) -> usize {
        self.table().max_len()
    }
    /// Tokens held by a slot.
    fn slot_len(&self, slot: SlotId) -> usize {
        self.table().slot_len(slot)
    }
    /// Appends each input's tokens to its slot in one batched pass and samples the next token of
    /// every input, returned in input order. Slots must be distinct.
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError>;
    /// Like [`Self::step`], but each input may get several tokens: a chunk `c` continues the
    /// input's slot with `c[0]`, then `c[1]` after it, and so on; afterwards the slot holds the
    /// input's tokens and every chunk token but the last (which, like `step`'s token, comes back
    /// as the next input). A failure is per input, so that one failed call fails only its own
    /// thread. The default takes one [`Self::step`]: chunks of one token.
    fn step_many(
        &mut self,
        inputs: &[StepInput<'_>],
        horizons: &[Horizon],
    ) -> Vec<Result<Vec<Sampled>, DecoderError>> {
        let _ = horizons;
        match self.step(inputs) {
            Ok(sampled) => sampled.into_iter().map(|s| Ok(vec![s])).collect(),
            Err(e) => inputs.iter().map(|_| Err(e.clone())).collect(),
        }
    }
    /// Keeps the first `len` tokens of a slot (a KV prefix), dropping the rest.
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError>;
    /// Empties a slot for reuse.
    fn release(&mut self, slot: SlotId);
}

/// Text ↔ tokens for the runtime.
pub trait TextCodec {
    /// Tokens of a text (no BOS/EOS). Text the vocabulary cannot express is an error.
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// The text one token stands for.
    fn piece(&self, token: u32) -> &str;
    /// Beginning-of-sequence token.
    fn bos(&self) -> u32;
    /// End-of-sequence token.
    fn eos(&self) -> u32;
}

/// A uniform in [0, 1) from a thread seed and a position (SplitMix64), shared by every decoder
/// so that sampled streams agree across implementations.
pub fn uniform_at(seed: u64, position: usize) -> f64 {
    let mut z = seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
