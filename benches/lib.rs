//! Shared helpers for the criterion benchmarks and throughput examples (see benches/).

use apr_rl::sft::Example;

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
