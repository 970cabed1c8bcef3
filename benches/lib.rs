//! Shared helpers for the criterion benchmarks and throughput examples (see benches/).

use apr_model::learner::{LearnError, Learner};
use apr_model::native::PackedBatch;
use apr_rl::sft::Example;

/// Makes the process keep freed buffers in its heap (a training step allocates and frees tens of
/// megabytes of activations; by glibc's defaults they go back to the kernel and every step pays
/// page faults on fresh pages: SFT at 2,048-token batches ≈7.3k → 8.5k tokens/s with this).
/// Process-wide, so each binary sets it (the apr binary does too), never a library. A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator thresholds; glibc serialises it with allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// `batch` synthetic training rows of `seq + 1` tokens (loss on every target): the rows every
/// throughput measurement trains on, the same as `synthetic_ids` in `scripts/cpu_baseline.py`.
pub fn synthetic_examples(batch: usize, seq: usize) -> Vec<Example> {
    (0..batch)
        .map(|i| Example {
            tokens: (0..=seq)
                .map(|t| 4 + ((t * 7 + i * 3) % 50) as u32)
                .collect(),
            untrained: Vec::new(),
        })
        .collect()
}

/// [`synthetic_examples`] packed end to end, as a [`Learner`] takes them.
pub fn synthetic_batch(batch: usize, seq: usize) -> PackedBatch {
    let examples = synthetic_examples(batch, seq);
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.tokens.as_slice()).collect();
    PackedBatch::from_sequences(&seqs)
}

/// One SFT micro-batch through a learner: its forward pass, then the backward pass of the mean
/// negative log-likelihood of every target.
pub fn forward_backward(learner: &mut dyn Learner, batch: &PackedBatch) -> Result<(), LearnError> {
    learner.forward(batch)?;
    let scale = -1.0 / batch.len().max(1) as f32;
    learner.backward(&vec![scale; batch.len()])
}
