//! Batch-invariant kernels for the CPU engine.
//!
//! Every output element is computed by the same sequence of floating-point operations whatever
//! else shares the step: how many slots, how many tokens each prefills, how many threads run.
//! A slot's logits, hence its sampled tokens and log-probabilities, are then a function of its
//! own context alone, which the runtime's `uniform_at(seed, position)` contract needs; a parent
//! that lent its slot to its children and replays its context gets the same KV state it had.
//!
//! The price is a dot-product formulation instead of a blocked GEMM (whose reduction order
//! changes with the matrix shape). Each dot product sums [`LANES`] strided partials in order and
//! then the partials in order, with separate multiplies and adds (Rust never fuses them), so the
//! AVX2 and the baseline builds of a kernel give the same bits on any x86-64 CPU.

use rayon::prelude::*;

use crate::simd::{multiversion, Isa, Simd};

/// Partial sums per dot product.
pub const LANES: usize = 8;
/// Rows of `x` that share each load of a weight row.
const ROWS: usize = 4;

/// `Σ aᵢ bᵢ` in the fixed order every kernel here uses.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ((ca, ta), (cb, tb)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
        acc[l] += x * y;
    }
    acc.into_iter().sum()
}

/// [`dot`] of [`ROWS`] rows against one `w`, loading each chunk of `w` once; every result has
/// exactly the bits [`dot`] would give.
#[inline(always)]
fn dot_rows(x: [&[f32]; ROWS], w: &[f32]) -> [f32; ROWS] {
    let mut acc = [[0.0f32; LANES]; ROWS];
    let full = w.len() / LANES * LANES;
    let mut i = 0;
    while i < full {
        let wc = &w[i..i + LANES];
        for r in 0..ROWS {
            let xc = &x[r][i..i + LANES];
            for l in 0..LANES {
                acc[r][l] += xc[l] * wc[l];
            }
        }
        i += LANES;
    }
    for r in 0..ROWS {
        for (l, j) in (full..w.len()).enumerate() {
            acc[r][l] += x[r][j] * w[j];
        }
    }
    acc.map(|a| a.into_iter().sum())
}

/// Rows of `x` per task when a batch is tall (prefill): they stay in cache while every weight
/// row passes over them.
const ROW_BLOCK: usize = 32;
/// Multiply-adds a parallel task should hold at least, so that small steps are not split into
/// tasks that cost more to schedule than to run.
const MIN_TASK: usize = 1 << 16;

/// [`dot`] of `R` rows of `x` against `C` weight rows with AVX2 vectors: `R × C` independent
/// accumulators, each lane summed exactly as [`dot`] sums it (multiply, then add, lane by lane;
/// then the lanes in order), so every result has [`dot`]'s bits. Rows must be a multiple of
/// [`LANES`] long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2<const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[f32]; C],
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let len = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i < len {
        // SAFETY: every row is `len` long and `i + LANES <= len` (len is a multiple of LANES).
        let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w[c].as_ptr().add(i)));
        for r in 0..R {
            let xr = _mm256_loadu_ps(x[r].as_ptr().add(i));
            for c in 0..C {
                acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_mul_ps(xr, wv[c]));
            }
        }
        i += LANES;
    }
    let mut out = [[0.0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0.0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
            out[r][c] = lanes.into_iter().sum();
        }
    }
    out
}

/// `out[r · stride + c] = x_r · w_c` (or `+=`) with the AVX2 microkernel where it applies.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_avx2(
    out: &mut [f32],
    stride: usize,
    accumulate: bool,
    x: &[f32],
    w: &[f32],
    in_dim: usize,
) {
    if !in_dim.is_multiple_of(LANES) {
        return block(out, stride, accumulate, x, w, in_dim);
    }
    let n = x.len() / in_dim;
    let cols = w.len() / in_dim;
    let row = |r: usize| &x[r * in_dim..(r + 1) * in_dim];
    let wrow = |c: usize| &w[c * in_dim..(c + 1) * in_dim];
    let mut put = |r: usize, c: usize, v: f32| {
        let o = &mut out[r * stride + c];
        *o = if accumulate { *o + v } else { v };
    };
    let mut c = 0;
    while c + 4 <= cols {
        let ws = [wrow(c), wrow(c + 1), wrow(c + 2), wrow(c + 3)];
        let mut r = 0;
        while r + ROWS <= n {
            let pairs = [[ws[0], ws[1]], [ws[2], ws[3]]];
            for (half, wp) in pairs.into_iter().enumerate() {
                let got = dots_avx2([row(r), row(r + 1), row(r + 2), row(r + 3)], wp);
                for (k, vals) in got.into_iter().enumerate() {
                    for (j, v) in vals.into_iter().enumerate() {
                        put(r + k, c + 2 * half + j, v);
                    }
                }
            }
            r += ROWS;
        }
        for r in r..n {
            let [vals] = dots_avx2([row(r)], ws);
            for (j, v) in vals.into_iter().enumerate() {
                put(r, c + j, v);
            }
        }
        c += 4;
    }
    if c < cols {
        let o = &mut out[c..];
        block(o, stride, accumulate, x, &w[c * in_dim..], in_dim);
    }
}

/// `out[r · stride + c] = x_r · w_c` (or `+=`) for the rows `x` and the weight rows `w`.
#[inline(always)]
fn block(out: &mut [f32], stride: usize, accumulate: bool, x: &[f32], w: &[f32], in_dim: usize) {
    let n = x.len() / in_dim;
    let row = |r: usize| &x[r * in_dim..(r + 1) * in_dim];
    let mut put = |r: usize, c: usize, v: f32| {
        let o = &mut out[r * stride + c];
        *o = if accumulate { *o + v } else { v };
    };
    for (c, wc) in w.chunks_exact(in_dim).enumerate() {
        let mut r = 0;
        while r + ROWS <= n {
            let got = dot_rows([row(r), row(r + 1), row(r + 2), row(r + 3)], wc);
            for (k, v) in got.into_iter().enumerate() {
                put(r + k, c, v);
            }
            r += ROWS;
        }
        for r in r..n {
            put(r, c, dot(row(r), wc));
        }
    }
}

/// [`block`], in the AVX2 build when [`Simd::chosen`] has it (same bits: no fused multiply-adds).
fn block_dispatch(
    out: &mut [f32],
    stride: usize,
    accumulate: bool,
    x: &[f32],
    w: &[f32],
    in_dim: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if Simd::chosen().isa() >= Isa::Avx2 {
        // SAFETY: a `Simd` names only extensions this CPU has; AVX2 is the one `block_avx2` needs.
        return unsafe { block_avx2(out, stride, accumulate, x, w, in_dim) };
    }
    block(out, stride, accumulate, x, w, in_dim)
}

/// `out = x · Wᵀ` (or `out +=` when `accumulate`) for `x: [n × in_dim]` and the row-major
/// weight `w: [out_dim × in_dim]`, each element a [`dot`] of a row of `x` and a row of `w`.
/// Tall batches are split by rows, short ones (decode) by weight rows; either way no element's
/// arithmetic depends on the split.
pub fn linear(
    out: &mut [f32],
    accumulate: bool,
    x: &[f32],
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
) {
    let n = x.len() / in_dim.max(1);
    assert!(
        in_dim > 0
            && x.len() == n * in_dim
            && w.len() == out_dim * in_dim
            && out.len() == n * out_dim,
        "linear shapes"
    );
    if n == 0 || out_dim == 0 {
        return;
    }
    if n >= 2 * ROW_BLOCK {
        out.par_chunks_mut(ROW_BLOCK * out_dim)
            .zip(x.par_chunks(ROW_BLOCK * in_dim))
            .for_each(|(o, xb)| block_dispatch(o, out_dim, accumulate, xb, w, in_dim));
        return;
    }
    let cols = (MIN_TASK / (n * in_dim)).max(8).min(out_dim);
    let tiles: Vec<Vec<f32>> = w
        .par_chunks(cols * in_dim)
        .map(|wb| {
            let mut t = vec![0.0; n * (wb.len() / in_dim)];
            let width = wb.len() / in_dim;
            block_dispatch(&mut t, width, false, x, wb, in_dim);
            t
        })
        .collect();
    for (b, t) in tiles.iter().enumerate() {
        let width = t.len() / n;
        for r in 0..n {
            let dst = &mut out[r * out_dim + b * cols..][..width];
            let src = &t[r * width..(r + 1) * width];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Causal attention of the query rows `q: [t × d]` at positions `start..start + t` over one
/// slot's cached keys and values (`[start + t × d]` each), head by head, into `out: [t × d]`.
/// Each query row is computed alone (scores by [`dot`], `softmax`, values summed in position
/// order), so its result does not depend on how many rows were prefilled with it.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    out: &mut [f32],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    start: usize,
    d: usize,
    heads: usize,
    softmax: impl Fn(&mut [f32]) + Sync,
) {
    let simd = Simd::chosen();
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .enumerate()
        .for_each(|(i, (o, qi))| {
            let cache = Cache {
                keys,
                values,
                visible: start + i + 1,
                d,
                heads,
            };
            attend_row(simd, o, qi, &cache, &softmax);
        });
}

/// The keys and values one query row attends over: the first `visible` rows of the cache.
struct Cache<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    visible: usize,
    d: usize,
    heads: usize,
}

multiversion! {
    /// One query row of [`attend`]. Every head's scores come from one pass over the keys, and every
    /// head's output from one pass over the values (each cached row is read once, not once a head);
    /// each score and each output element is still summed in its fixed order.
    fn attend_row(simd, o: &mut [f32], qi: &[f32], c: &Cache, softmax: &impl Fn(&mut [f32])) {
        let (d, visible) = (c.d, c.visible);
        let hd = d / c.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Head-major: head h's scores are `scores[h · visible..][..visible]`.
        let mut scores = vec![0.0f32; c.heads * visible];
        for (j, key) in c.keys[..visible * d].chunks_exact(d).enumerate() {
            for (h, (qh, kh)) in qi.chunks_exact(hd).zip(key.chunks_exact(hd)).enumerate() {
                scores[h * visible + j] = dot(qh, kh) * scale;
            }
        }
        for head in scores.chunks_exact_mut(visible) {
            softmax(head);
        }
        o.fill(0.0);
        for (j, value) in c.values[..visible * d].chunks_exact(d).enumerate() {
            for (h, (oh, vh)) in o
                .chunks_exact_mut(hd)
                .zip(value.chunks_exact(hd))
                .enumerate()
            {
                let p = scores[h * visible + j];
                for (dst, &v) in oh.iter_mut().zip(vh) {
                    *dst += p * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, salt: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ salt) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    #[test]
    fn a_row_of_linear_has_the_same_bits_in_any_batch() {
        // 64 takes the AVX2 microkernel (where the CPU has it), 67 the portable one.
        for (out_dim, in_dim) in [(37, 67), (37, 64), (6, 128)] {
            linear_case(out_dim, in_dim);
        }
    }

    fn linear_case(out_dim: usize, in_dim: usize) {
        let w = data(out_dim * in_dim, 1);
        let x = data(9 * in_dim, 2);
        let mut all = vec![0.0; 9 * out_dim];
        linear(&mut all, false, &x, &w, out_dim, in_dim);
        for r in 0..9 {
            let mut one = vec![0.0; out_dim];
            linear(
                &mut one,
                false,
                &x[r * in_dim..(r + 1) * in_dim],
                &w,
                out_dim,
                in_dim,
            );
            for c in 0..out_dim {
                let direct = dot(
                    &x[r * in_dim..(r + 1) * in_dim],
                    &w[c * in_dim..(c + 1) * in_dim],
                );
                assert_eq!(
                    all[r * out_dim + c].to_bits(),
                    one[c].to_bits(),
                    "row {r} col {c}"
                );
                assert_eq!(one[c].to_bits(), direct.to_bits(), "row {r} col {c}");
            }
        }
        // The baseline build agrees with whichever build the dispatch chose, and a tall batch
        // (split by rows) with a short one (split by weight rows).
        let (mut plain, mut chosen) = (vec![0.0; 9 * out_dim], vec![0.0; 9 * out_dim]);
        block(&mut plain, out_dim, false, &x, &w, in_dim);
        block_dispatch(&mut chosen, out_dim, false, &x, &w, in_dim);
        assert_eq!(plain, chosen);
        assert_eq!(plain, all);
        let tall_x = data(100 * in_dim, 6);
        let mut tall = vec![0.0; 100 * out_dim];
        linear(&mut tall, false, &tall_x, &w, out_dim, in_dim);
        let mut one = vec![0.0; out_dim];
        linear(
            &mut one,
            false,
            &tall_x[77 * in_dim..78 * in_dim],
            &w,
            out_dim,
            in_dim,
        );
        assert_eq!(&tall[77 * out_dim..78 * out_dim], &one[..]);
        let mut acc = all.clone();
        linear(&mut acc, true, &x, &w, out_dim, in_dim);
        assert!(acc.iter().zip(&all).all(|(a, b)| *a == 2.0 * b));
    }

    #[test]
    fn an_attention_row_has_the_same_bits_however_it_was_prefilled() {
        let (d, heads, len) = (16, 2, 11);
        let (q, k, v) = (data(len * d, 3), data(len * d, 4), data(len * d, 5));
        let softmax = |row: &mut [f32]| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for z in row.iter_mut() {
                *z = (*z - max).exp();
                sum += *z;
            }
            for z in row.iter_mut() {
                *z /= sum;
            }
        };
        let mut whole = vec![0.0; len * d];
        attend(&mut whole, &q, &k, &v, 0, d, heads, softmax);
        for split in [1, 4, 10] {
            let mut tail = vec![0.0; (len - split) * d];
            attend(&mut tail, &q[split * d..], &k, &v, split, d, heads, softmax);
            assert_eq!(&whole[split * d..], &tail[..], "prefix of {split}");
        }
    }

    /// Every vector extension's build of a row must give the portable build's bits, so that
    /// any CPU evaluates (and samples GRPO's rollouts) exactly as another.
    #[test]
    fn an_attention_row_has_the_same_bits_with_every_vector_extension() {
        // A head width that is not a multiple of the eight lanes, and one that is.
        for (d, heads, visible) in [(24, 2, 37), (128, 4, 300)] {
            let (q, k, v) = (data(d, 7), data(visible * d, 8), data(visible * d, 9));
            let cache = Cache {
                keys: &k,
                values: &v,
                visible,
                d,
                heads,
            };
            let softmax = |row: &mut [f32]| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|z| *z = (*z - max).exp());
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|z| *z /= sum);
            };
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut portable = vec![0.0; d];
            attend_row(Simd::PORTABLE, &mut portable, &q, &cache, &softmax);
            for simd in Simd::available() {
                let mut wide = vec![0.0; d];
                attend_row(simd, &mut wide, &q, &cache, &softmax);
                assert_eq!(
                    bits(&portable),
                    bits(&wide),
                    "{}: d {d}, {heads} heads",
                    simd.name()
                );
            }
        }
    }
}
