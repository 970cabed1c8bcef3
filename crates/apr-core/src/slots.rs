//! The slot bookkeeping every decoder shares: how many tokens each slot holds, what a step may
//! append, where each slot's next draw comes from, and what was prefilled and decoded. A decoder
//! owns its memory (KV caches, a server's token lists); this table owns the lengths, so every
//! decoder obeys one contract (llama.cpp's sequence API in spirit: one memory interface whatever
//! holds the keys).

use crate::step::{uniform_at, DecoderError, SlotId, StepInput};

/// Lengths and counters of a pool of slots.
#[derive(Clone, Debug)]
pub struct SlotTable {
    lens: Vec<usize>,
    max_len: usize,
    prefilled_tokens: u64,
    decoded_tokens: u64,
}

impl SlotTable {
    /// `slots` empty slots of up to `max_len` tokens each.
    pub fn new(slots: usize, max_len: usize) -> Self {
        SlotTable {
            lens: vec![0; slots],
            max_len,
            prefilled_tokens: 0,
            decoded_tokens: 0,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Tokens a slot may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens `slot` holds (0 for a slot that does not exist).
    pub fn slot_len(&self, slot: SlotId) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Tokens appended in multi-token (prefill) rows, and in one-token (decode) rows, so far.
    pub fn token_counts(&self) -> (u64, u64) {
        (self.prefilled_tokens, self.decoded_tokens)
    }

    /// Rejects a step that is empty, names a slot twice or out of range, appends nothing to a
    /// slot, or would overflow a slot's context.
    pub fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), DecoderError> {
        if inputs.is_empty() {
            return Err(DecoderError::Backend("empty step".into()));
        }
        let mut seen = vec![false; self.lens.len()];
        for input in inputs {
            let slot = input.slot;
            if slot >= self.lens.len() || std::mem::replace(&mut seen[slot], true) {
                return Err(DecoderError::BadSlot(slot));
            }
            if input.tokens.is_empty() {
                return Err(DecoderError::Backend(format!(
                    "slot {slot}: no tokens to append"
                )));
            }
            let len = self.lens[slot] + input.tokens.len();
            if len > self.max_len {
                return Err(DecoderError::ContextFull {
                    slot,
                    len,
                    limit: self.max_len,
                });
            }
        }
        Ok(())
    }

    /// The uniform behind each input's draw: `uniform_at(seed, p)` at the position `p` of the
    /// token it samples, so a thread's tokens do not depend on the batch it shares. Call before
    /// [`SlotTable::append`].
    pub fn draws(&self, inputs: &[StepInput<'_>]) -> Vec<f64> {
        inputs
            .iter()
            .map(|i| uniform_at(i.seed, self.slot_len(i.slot) + i.tokens.len()))
            .collect()
    }

    /// Records a checked step's tokens as appended.
    pub fn append(&mut self, inputs: &[StepInput<'_>]) {
        for input in inputs {
            let n = input.tokens.len();
            if n > 1 {
                self.prefilled_tokens += n as u64;
            } else {
                self.decoded_tokens += n as u64;
            }
            if let Some(len) = self.lens.get_mut(input.slot) {
                *len += n;
            }
        }
    }

    /// Records `n` tokens appended to `slot` outside a checked step (a decoder that samples
    /// several tokens a call keeps all but the last); false when there is no such slot or it
    /// would overflow.
    pub fn extend(&mut self, slot: SlotId, n: usize) -> bool {
        match self.lens.get_mut(slot) {
            Some(len) if *len + n <= self.max_len => {
                *len += n;
                self.decoded_tokens += n as u64;
                true
            }
            _ => false,
        }
    }

    /// Keeps at most `len` tokens of `slot`; returns the length it now holds.
    pub fn truncate(&mut self, slot: SlotId, len: usize) -> Result<usize, DecoderError> {
        let current = self.lens.get_mut(slot).ok_or(DecoderError::BadSlot(slot))?;
        *current = (*current).min(len);
        Ok(*current)
    }

    /// Empties `slot`; false when there is no such slot.
    pub fn release(&mut self, slot: SlotId) -> bool {
        match self.lens.get_mut(slot) {
            Some(len) => {
                *len = 0;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::Sampling;

    fn input(slot: SlotId, tokens: &[u32]) -> StepInput<'_> {
        StepInput {
            slot,
            tokens,
            sampling: Sampling::GREEDY,
            seed: 7,
        }
    }

    #[test]
    fn a_step_is_checked_counted_and_rewound() {
        let mut table = SlotTable::new(2, 4);
        assert!(table.check(&[]).is_err());
        assert_eq!(
            table.check(&[input(0, &[1]), input(0, &[2])]),
            Err(DecoderError::BadSlot(0))
        );
        assert_eq!(
            table.check(&[input(2, &[1])]),
            Err(DecoderError::BadSlot(2))
        );
        assert!(table.check(&[input(1, &[])]).is_err());
        assert_eq!(
            table.check(&[input(1, &[1, 2, 3, 4, 5])]),
            Err(DecoderError::ContextFull {
                slot: 1,
                len: 5,
                limit: 4
            })
        );

        let step = [input(0, &[1, 2, 3]), input(1, &[4])];
        table.check(&step).unwrap();
        assert_eq!(table.draws(&step), vec![uniform_at(7, 3), uniform_at(7, 1)]);
        table.append(&step);
        assert_eq!((table.slot_len(0), table.slot_len(1)), (3, 1));
        assert_eq!(table.token_counts(), (3, 1));
        assert!(
            table.check(&[input(0, &[1, 2])]).is_err(),
            "would hold 5 of 4"
        );

        assert_eq!(table.truncate(0, 1), Ok(1));
        assert_eq!(table.truncate(0, 9), Ok(1), "truncate never grows a slot");
        assert_eq!(table.truncate(5, 0), Err(DecoderError::BadSlot(5)));
        assert!(table.release(1) && !table.release(5));
        assert_eq!(
            (table.slot_len(0), table.slot_len(1), table.slot_len(9)),
            (1, 0, 0)
        );
    }
}
