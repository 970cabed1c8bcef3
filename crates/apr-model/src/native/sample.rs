//! Sampling one token from a row of logits on the host.

use apr_core::decoder::{Sampled, Sampling};

use super::kernels::{exp, ln};

/// One draw from a row of logits, the host twin of the device sampler in [`crate::engine`]:
/// greedy is the argmax; otherwise logits are divided by the temperature, sorted, cut by
/// top-k and top-p (a token stays while the mass before it is below p), and the token where the
/// cumulative kept mass first reaches `u × total` is taken. The log-probability is at τ = 1.
/// `exp` and `ln` are ours, not libm's, so a draw is the same sequence of IEEE operations on
/// every machine and C library (GRPO's rollouts, hence its weights, depend on it).
pub fn sample(logits: &[f32], sampling: Sampling, u: f64) -> Sampled {
    let v = logits.len();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + ln(logits.iter().map(|&z| exp(z - max)).sum::<f32>());
    let token = if sampling.temperature <= 0.0 {
        logits.iter().position(|&z| z == max).unwrap_or(0)
    } else {
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let t = sampling.temperature;
        let top = logits[order[0]] / t;
        let weights: Vec<f32> = order.iter().map(|&i| exp(logits[i] / t - top)).collect();
        let sum: f32 = weights.iter().sum();
        let k = if sampling.top_k == 0 {
            v
        } else {
            sampling.top_k
        };
        let p = if sampling.top_p > 0.0 && sampling.top_p < 1.0 {
            sampling.top_p
        } else {
            2.0
        };
        let mut before = 0.0;
        let mut cdf = Vec::with_capacity(v);
        let mut kept_total = 0.0;
        for (rank, w) in weights.iter().enumerate() {
            let prob = w / sum;
            if rank < k && before < p {
                kept_total += prob;
            }
            before += prob;
            cdf.push(kept_total);
        }
        let threshold = u as f32 * kept_total;
        let pick = cdf.iter().filter(|&&c| c < threshold).count().min(v - 1);
        order[pick]
    };
    Sampled {
        token: token as u32,
        logprob: logits[token] - lse,
    }
}
