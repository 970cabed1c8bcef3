//! A training batch without padding: sequences laid end to end.

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

    /// Checks that the boundaries describe the positions, every token is below `vocab`, and no
    /// sequence is longer than `max_len`.
    pub fn check(&self, vocab: usize, max_len: usize) -> Result<(), BatchError> {
        let n = self.len();
        if self.targets.len() != n
            || self.bounds.first() != Some(&0)
            || self.bounds.last() != Some(&n)
            || self.bounds.windows(2).any(|w| w[0] > w[1])
        {
            return Err(BatchError::Bounds(n));
        }
        if let Some(&t) = self
            .inputs
            .iter()
            .chain(&self.targets)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(BatchError::Token(t, vocab));
        }
        if let Some(w) = self.bounds.windows(2).find(|w| w[1] - w[0] > max_len) {
            return Err(BatchError::TooLong(w[1] - w[0], max_len));
        }
        Ok(())
    }

    /// Position of every packed token inside its own sequence.
    pub(super) fn positions(&self) -> Vec<usize> {
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
