//! The reference implementation of every [`FastOps`] method, in burn's primitive ops, for any
//! backend. Softmax statistics (max, sum, log-sum-exp, `rowsum(dout ∘ out)`) are f32 whatever
//! the inputs' dtype; products run in the inputs' dtype through [`FastOps::fast_matmul`].

use burn::backend::tensor::FloatTensor;
use burn::backend::{Shape, Slice, TensorData, TensorMetadata};
use burn::tensor::FloatDType;

use super::{AttentionForward, AttentionGrads, AttentionSaved, FastOps};

/// `op(lhs) · op(rhs)` with burn's matmul (which reads transposed views as they are).
pub(super) fn matmul<B: FastOps>(
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
    transpose_lhs: bool,
    transpose_rhs: bool,
) -> FloatTensor<B> {
    let t = |x: FloatTensor<B>, yes: bool| {
        if yes {
            let r = x.shape().num_dims();
            B::float_swap_dims(x, r - 2, r - 1)
        } else {
            x
        }
    };
    B::float_matmul(t(lhs, transpose_lhs), t(rhs, transpose_rhs))
}

fn dims4<B: FastOps>(x: &FloatTensor<B>) -> [usize; 4] {
    let s = x.shape();
    [s[0], s[1], s[2], s[3]]
}

/// Rows `range` of dimension 2 of a `[b, h, s, ·]` tensor.
fn rows<B: FastOps>(x: &FloatTensor<B>, range: std::ops::Range<usize>) -> FloatTensor<B> {
    let [b, h, _, d] = dims4::<B>(x);
    B::float_slice(
        x.clone(),
        &[
            Slice::from(0..b),
            Slice::from(0..h),
            Slice::from(range),
            Slice::from(0..d),
        ],
    )
}

fn f32<B: FastOps>(x: FloatTensor<B>) -> FloatTensor<B> {
    cast::<B>(x, FloatDType::F32)
}

fn cast<B: FastOps>(x: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    if FloatDType::from(x.dtype()) == dtype {
        x
    } else {
        B::float_cast(x, dtype)
    }
}

/// `[1, 1, n, n]` f32: 0 where key `j` is at or before query `i`, −∞ after it. Made once per
/// call: a block's keys before its first query are all visible, so only its last `n` keys (the
/// diagonal square) need it.
fn causal_square<B: FastOps>(n: usize, device: &B::Device) -> FloatTensor<B> {
    let mut bias = vec![0.0f32; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            bias[i * n + j] = f32::NEG_INFINITY;
        }
    }
    B::float_from_data(TensorData::new(bias, [1, 1, n, n]), device)
}

/// One query block's f32 scaled, masked scores `[b, h, n, end]` against keys `0..end`, given
/// the [`causal_square`] of the largest block.
fn block_scores<B: FastOps>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    range: std::ops::Range<usize>,
    scale: f64,
    square: &FloatTensor<B>,
) -> FloatTensor<B> {
    let (start, end) = (range.start, range.end);
    let n = end - start;
    let qb = rows::<B>(q, range);
    let kb = rows::<B>(k, 0..end);
    let scores = f32::<B>(B::fast_matmul(qb, kb, false, true));
    let scores = B::float_mul_scalar(scores, scale.into());
    let mask = B::float_slice(
        square.clone(),
        &[
            Slice::from(0..1),
            Slice::from(0..1),
            Slice::from(0..n),
            Slice::from(0..n),
        ],
    );
    if start == 0 {
        return B::float_add(scores, mask);
    }
    let [b, h, _, _] = dims4::<B>(&scores);
    let diagonal = [
        Slice::from(0..b),
        Slice::from(0..h),
        Slice::from(0..n),
        Slice::from(start..end),
    ];
    let masked = B::float_add(B::float_slice(scores.clone(), &diagonal), mask);
    B::float_slice_assign(scores, &diagonal, masked)
}

fn blocks(s: usize, block: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let block = block.max(1);
    (0..s).step_by(block).map(move |i| i..(i + block).min(s))
}

/// Causal attention a block of queries at a time; each block attends only to the keys up to its
/// last query, so a blocked forward does about half the products of an unblocked one.
pub(super) fn attention_forward<B: FastOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f64,
    block: usize,
) -> AttentionForward<B> {
    let [_, _, s, _] = dims4::<B>(&q);
    let dtype = FloatDType::from(q.dtype());
    let square = causal_square::<B>(block.clamp(1, s.max(1)), &q.device());
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for range in blocks(s, block) {
        let end = range.end;
        let scores = block_scores::<B>(&q, &k, range, scale, &square);
        let max = B::float_max_dim(scores.clone(), 3);
        let p = B::float_exp(B::float_sub(scores, max.clone()));
        let sum = B::float_sum_dim(p.clone(), 3);
        let pv = B::fast_matmul(cast::<B>(p, dtype), rows::<B>(&v, 0..end), false, false);
        let out = B::float_div(f32::<B>(pv), sum.clone());
        outs.push(cast::<B>(out, dtype));
        lses.push(B::float_add(max, B::float_log(sum)));
    }
    AttentionForward {
        out: B::float_cat(outs, 2),
        lse: B::float_cat(lses, 2),
    }
}

/// Adds `part` (`[b, h, n, d]`, f32) into rows `0..n` of `acc` (`[b, h, s, d]`, f32).
fn add_rows<B: FastOps>(acc: FloatTensor<B>, part: FloatTensor<B>) -> FloatTensor<B> {
    let [b, h, n, d] = dims4::<B>(&part);
    let [_, _, s, _] = dims4::<B>(&acc);
    if n == s {
        return B::float_add(acc, part);
    }
    let range = [
        Slice::from(0..b),
        Slice::from(0..h),
        Slice::from(0..n),
        Slice::from(0..d),
    ];
    let sum = B::float_add(B::float_slice(acc.clone(), &range), part);
    B::float_slice_assign(acc, &range, sum)
}

/// The gradients of causal attention: per query block, `P = exp(scores − lse)`,
/// `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))`, `dQ = dS K · scale`,
/// `dK += dSᵀ Q · scale`. dK and dV accumulate in f32.
pub(super) fn attention_backward<B: FastOps>(
    saved: AttentionSaved<B>,
    dout: FloatTensor<B>,
    scale: f64,
    block: usize,
) -> AttentionGrads<B> {
    let AttentionSaved { q, k, v, out, lse } = saved;
    let [b, h, s, d] = dims4::<B>(&q);
    let dtype = FloatDType::from(q.dtype());
    let device = q.device();
    let dout = cast::<B>(dout, dtype);
    let delta = B::float_sum_dim(B::float_mul(f32::<B>(dout.clone()), f32::<B>(out)), 3);
    let zeros = || B::float_zeros(Shape::from([b, h, s, d]), &device, FloatDType::F32);
    let (mut dk, mut dv) = (zeros(), zeros());
    let square = causal_square::<B>(block.clamp(1, s.max(1)), &device);
    let mut dqs = Vec::new();
    for range in blocks(s, block) {
        let end = range.end;
        let scores = block_scores::<B>(&q, &k, range.clone(), scale, &square);
        let p = B::float_exp(B::float_sub(scores, rows::<B>(&lse, range.clone())));
        let dob = rows::<B>(&dout, range.clone());
        let (kb, vb) = (rows::<B>(&k, 0..end), rows::<B>(&v, 0..end));
        let dv_part = B::fast_matmul(cast::<B>(p.clone(), dtype), dob.clone(), true, false);
        dv = add_rows::<B>(dv, f32::<B>(dv_part));
        // dP in f32, as the flash kernel keeps it: `dP − rowsum(dO ∘ O)` cancels (exactly, for a
        // row that sees one key), and a dP rounded to bf16 left its rounding error in dS.
        let dp = B::fast_matmul(f32::<B>(dob), f32::<B>(vb), false, true);
        let ds = B::float_mul(p, B::float_sub(dp, rows::<B>(&delta, range.clone())));
        let ds = cast::<B>(B::float_mul_scalar(ds, scale.into()), dtype);
        dqs.push(B::fast_matmul(ds.clone(), kb, false, false));
        let dk_part = B::fast_matmul(ds, rows::<B>(&q, range), true, false);
        dk = add_rows::<B>(dk, f32::<B>(dk_part));
    }
    AttentionGrads {
        dq: B::float_cat(dqs, 2),
        dk: cast::<B>(dk, dtype),
        dv: cast::<B>(dv, dtype),
    }
}
