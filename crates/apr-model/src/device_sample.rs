//! Sampling one token per row on the device, without a sort: the device twin of the host sampler
//! in [`crate::native::sample`] (same rule, same draws, so the engines' streams agree).
//!
//! Why no sort: burn's CubeCL backends sort on the host (a read-back and an upload mid-step), and
//! nothing that reads back can be captured into a CUDA graph. Every quantity the host sampler
//! takes from the sorted order is a sum over "the tokens ranked before this one", so it is
//! computed directly from a pairwise comparison of the row's logits (`[rows, v, v]`, in chunks
//! of rows so that it stays within [`PAIRWISE_BUDGET`] elements):
//!
//! * `rank(i)`: tokens with a larger logit, or an equal one at a lower index (the host's stable
//!   sort);
//! * `before(i)`: their probability mass at temperature τ;
//! * token `i` is kept while `rank(i) < k` and `before(i) < p`, a prefix of the ranks;
//! * with `threshold = u × kept mass`, the pick is the rank equal to the number of kept tokens
//!   whose inclusive mass `before(i) + prob(i)` is below the threshold.
//!
//! Everything is computed in f32 whatever the device's float type (a bf16 uniform has 256
//! levels), and ranks and counts in integers.

use apr_core::decoder::Sampling;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{
    Bool, DType, Device, FloatDType, Int, Tensor, TensorCreationOptions, TensorData,
};

/// Most elements of one pairwise-comparison chunk (`rows × chunk × v`).
pub const PAIRWISE_BUDGET: usize = 1 << 24;

/// Fields of a draw table, one table row each (so that every field is a contiguous `[1, rows]`
/// view): temperature (0 for greedy), top-k (`v` when off), top-p (2 when off), the uniform.
pub const DRAW_FIELDS: usize = 4;

/// One slot's column of the draw table: its sampling settings and its uniform.
pub fn draw_fields(sampling: Sampling, u: f64, vocab: usize) -> [f32; DRAW_FIELDS] {
    let k = if sampling.top_k == 0 {
        vocab
    } else {
        sampling.top_k.min(vocab)
    };
    let p = if sampling.top_p > 0.0 && sampling.top_p < 1.0 {
        sampling.top_p
    } else {
        2.0
    };
    [sampling.temperature.max(0.0), k as f32, p, u as f32]
}

/// An f32 tensor on `device` whatever its default float type.
pub fn f32_tensor<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(values, shape),
        TensorCreationOptions::new(device.clone()).with_dtype(DType::F32),
    )
}

/// Constants a sampler over `v` tokens needs, made once (a captured step must not upload).
#[derive(Clone, Debug)]
pub struct SamplerTables {
    /// `[1, v, v]`: true where `j < i` (the tie-break of equal logits).
    lower_index: Tensor<3, Bool>,
}

impl SamplerTables {
    /// Tables for a vocabulary of `v` tokens.
    pub fn new(v: usize, device: &Device) -> Self {
        let lower: Vec<bool> = (0..v * v).map(|k| k % v < k / v).collect();
        SamplerTables {
            lower_index: Tensor::from_data(TensorData::new(lower, [1, v, v]), device),
        }
    }
}

/// Samples one token per row of `logits: [rows, v]` by the columns of `draws: [4, rows]` (see
/// [`draw_fields`]); returns the tokens `[rows, 1]` and their log-probabilities at τ = 1 `[rows, 1]`
/// (f32). Without a draw table every row takes its argmax.
pub fn sample_rows(
    logits: Tensor<2>,
    draws: Option<&Tensor<2>>,
    tables: &SamplerTables,
) -> (Tensor<2, Int>, Tensor<2>) {
    let logits = logits.cast(FloatDType::F32);
    let [rows, v] = logits.dims();
    let logp = log_softmax(logits.clone(), 1);
    let greedy = logits.clone().argmax(1);
    let Some(draws) = draws else {
        let lp = logp.gather(1, greedy.clone());
        return (greedy, lp);
    };
    let column = |c: usize| draws.clone().narrow(0, c, 1).reshape([rows, 1]);
    let (temperature, top_k, top_p, uniform) = (column(0), column(1), column(2), column(3));
    let is_greedy = temperature.clone().lower_equal_elem(0.0);
    let prob = softmax(
        logits.clone() / temperature.mask_fill(is_greedy.clone(), 1.0),
        1,
    );

    let chunk = (PAIRWISE_BUDGET / (rows * v).max(1)).clamp(1, v);
    let (mut ranks, mut befores) = (Vec::new(), Vec::new());
    let columns = logits.clone().reshape([rows, 1, v]);
    let mass = prob.clone().reshape([rows, v, 1]);
    for start in (0..v).step_by(chunk) {
        let c = chunk.min(v - start);
        let own = logits.clone().narrow(1, start, c).reshape([rows, c, 1]);
        let tie = tables.lower_index.clone().narrow(1, start, c);
        // precedes[r, i, j]: token j ranks before token i.
        let precedes = columns
            .clone()
            .greater(own.clone())
            .bool_or(columns.clone().equal(own).bool_and(tie))
            .int();
        ranks.push(precedes.clone().sum_dim(2).reshape([rows, c]));
        befores.push(
            precedes
                .cast(FloatDType::F32)
                .matmul(mass.clone())
                .reshape([rows, c]),
        );
    }
    let rank = Tensor::cat(ranks, 1);
    let before = Tensor::cat(befores, 1);

    let kept = rank
        .clone()
        .cast(FloatDType::F32)
        .lower(top_k)
        .bool_and(before.clone().lower(top_p));
    let kept_mass = prob
        .clone()
        .mask_fill(kept.clone().bool_not(), 0.0)
        .sum_dim(1);
    let threshold = uniform * kept_mass;
    let below = (before + prob).lower(threshold).bool_and(kept);
    let pick = below.int().sum_dim(1).clamp_max(v as i64 - 1);
    // An argmax over floats, as `greedy` is: its indices have the same int type.
    let sampled = rank.equal(pick).float().argmax(1);
    let chosen = sampled.mask_where(is_greedy, greedy);
    let lp = logp.gather(1, chosen.clone());
    (chosen, lp)
}

/// The draw table of a batch, `[4, rows]` f32 on the host: one [`draw_fields`] column per
/// `(sampling, uniform)`.
pub fn draw_table(params: &[(Sampling, f64)], vocab: usize) -> Vec<f32> {
    let rows = params.len();
    let mut table = vec![0.0; DRAW_FIELDS * rows];
    for (r, &(s, u)) in params.iter().enumerate() {
        for (f, value) in draw_fields(s, u, vocab).into_iter().enumerate() {
            table[f * rows + r] = value;
        }
    }
    table
}
