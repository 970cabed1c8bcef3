//! What the runtime asks of a language model: a pool of slots, each holding one thread's KV
//! state, advanced together in batched steps (the model-agnostic side of the engine).

use crate::slots::SlotTable;
pub use crate::step::{uniform_at, DecoderError, Horizon, Sampled, Sampling, SlotId, StepInput};

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
