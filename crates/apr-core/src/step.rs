//! One batched step's data: which slot, what to append, how to sample, what came back, why it
//! failed, and the draw every decoder takes for a thread's token at a position.

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
