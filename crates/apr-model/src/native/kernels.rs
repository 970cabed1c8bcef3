//! The host kernels of the native model: a fast `exp`, lane-parallel reductions, RMSNorm and its
//! backward, and RoPE (the matrix products are in `gemm.rs`). Every reduction has a fixed order,
//! so results do not depend on the number of threads.

use rayon::prelude::*;

use super::gemm::{matmul_packed, product, rows, PackedB};
use crate::invariant::dot;
use crate::simd::{multiversion, Simd};

/// Rotates one head (`x: [hd]`, halves rotated as HF's `rotate_half`) in place by RoPE at one
/// position, whose tables are `cos`, `sin` (`[hd / 2]` each); `inverse` applies the transposed
/// rotation, the backward pass. The only RoPE on the host: training and the engine share it.
#[inline(always)]
pub(super) fn rope_rotate(x: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let half = cos.len();
    // −sin is exact, so the inverse has the bits of writing `a·cos + b·sin` out.
    let sign = if inverse { -1.0 } else { 1.0 };
    for j in 0..half {
        let (a, b, s) = (x[j], x[j + half], sign * sin[j]);
        x[j] = a * cos[j] - b * s;
        x[j + half] = b * cos[j] + a * s;
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `eˣ` in f32 without a libm call, so that loops over it vectorise (libm's `expf` was an eighth
/// of a training step, one scalar call per attention score). `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 Taylor polynomial for `eʳ` (relative error below 3·10⁻⁷), and
/// `2ⁿ` built from its exponent bits. Inputs are clamped to `[−87.3, 88]` (results stay
/// normal); NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `ln x` in f32 without a libm call, for the same reason as [`exp`] and one more: libm's `logf`
/// differs between C libraries (and glibc picks a build per CPU), while this is the same
/// sequence of IEEE operations everywhere, so a training run does not depend on the machine.
/// `x = 2ᵉ·m` with `m ∈ [√½, √2)`, `ln m = 2·atanh s` for `s = (m − 1)/(m + 1)` (`|s| < 0.172`)
/// by its series to `s⁹` (truncation below 7·10⁻¹⁰, 2·10⁻⁹ relative). Zero gives `−∞`, a negative or NaN input
/// NaN, `+∞` itself; subnormals are scaled up first.
#[inline(always)]
pub(super) fn ln(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (x, bias) = if x < f32::MIN_POSITIVE {
        (x * (1u64 << 24) as f32, 24)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127 - bias;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let e = e as f32;
    e * LN2_HI + (2.0 * s + (2.0 * s * series + e * LN2_LO))
}

/// Partial results kept per reduction. The compiler may not reassociate f32 sums or maxima, so
/// a plain `.sum()` adds one element at a time (and a scalar `exp` with it); eight independent
/// partials vectorise. The order is fixed, so results stay deterministic.
pub(super) const LANES: usize = 8;

/// Folds `f(x)` of every element into [`LANES`] partials with the associative `combine`, then
/// combines the partials in order.
#[inline(always)]
pub(super) fn reduce_lanes(
    xs: &[f32],
    init: f32,
    f: impl Fn(f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; LANES];
    let (chunks, tail) = xs.as_chunks::<LANES>();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = combine(*a, f(x));
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a = combine(*a, f(x));
    }
    acc.into_iter().fold(init, combine)
}

/// The largest element (`−∞` for none; NaN elements are skipped, as by `f32::max`).
#[inline(always)]
pub(super) fn max_of(xs: &[f32]) -> f32 {
    reduce_lanes(xs, f32::NEG_INFINITY, |x| x, f32::max)
}

/// `Σ exp(z − shift)`.
pub(super) fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
    reduce_lanes(xs, 0.0, |z| exp(z - shift), |a, b| a + b)
}

/// In place, the softmax of `row`; returns its log-sum-exp. (Inlined, so that a caller compiled
/// for wider vectors runs it with them.)
#[inline(always)]
pub(super) fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = max_of(row);
    for z in row.iter_mut() {
        *z = exp(*z - max);
    }
    let sum = reduce_lanes(row, 0.0, |z| z, |a, b| a + b);
    let inv = 1.0 / sum;
    for z in row.iter_mut() {
        *z *= inv;
    }
    max + ln(sum)
}

/// A linear layer into a new buffer: `x · Wᵀ` for the row-major `[w.len() / in_dim, in_dim]`
/// weight `w`.
pub(super) fn linear(x: &[f32], w: &[f32], in_dim: usize) -> Vec<f32> {
    let weight = rows(w, w.len() / in_dim, in_dim);
    product(rows(x, x.len() / in_dim, in_dim), weight.t(), true)
}

/// Backward of linear layers that read the same input (`y = x · Wᵀ`) to their weights:
/// `grads[w..] += dyᵀ · x` for each `(w, dy, out_dim)`. `x` is packed once for all of them (q, k
/// and v share it, as do gate and up); the bits are those of one product per layer.
pub(super) fn weight_grads(
    grads: &mut [f32],
    x: &[f32],
    in_dim: usize,
    layers: &[(usize, &[f32], usize)],
) {
    let n = x.len() / in_dim;
    let x = PackedB::new(rows(x, n, in_dim), true);
    for &(w, dy, out_dim) in layers {
        matmul_packed(
            &mut grads[w..][..out_dim * in_dim],
            true,
            rows(dy, n, out_dim).t(),
            &x,
            in_dim,
            true,
        );
    }
}

/// Splits a `[n, width]` buffer into the rows of each sequence.
pub(super) fn split_rows<'a>(
    mut buf: &'a mut [f32],
    bounds: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(bounds.len().saturating_sub(1));
    for w in bounds.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// Elements below which a buffer is zeroed or copied by the calling thread alone.
const PARALLEL_FILL: usize = 1 << 16;

/// `n` zeros, written by the whole pool when `n` is large. A step's buffers come back from the
/// allocator as reused memory, which `vec![0.0; n]` (calloc) clears on the calling thread while
/// the pool waits (a tenth of a step at 8 × 1,024 tokens on 2 threads, before this).
pub(super) fn zeros(n: usize) -> Vec<f32> {
    if n < PARALLEL_FILL {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0.0f32, n));
    v
}

/// A copy of `x`, written by the whole pool when `x` is large (as [`zeros`]).
pub(super) fn copy_of(x: &[f32]) -> Vec<f32> {
    if x.len() < PARALLEL_FILL {
        return x.to_vec();
    }
    let mut v = Vec::with_capacity(x.len());
    v.par_extend(x.par_iter().copied());
    v
}

/// Rows per parallel task in the row-wise kernels below (results do not depend on it).
const ROW_TASK: usize = 16;

/// RMSNorm of every row: `(1 / rms, x / rms · w)`.
pub(super) fn rms_forward(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / d;
    let mut inv = vec![0.0; n];
    let mut y = zeros(n * d);
    let simd = Simd::chosen();
    y.par_chunks_mut(ROW_TASK * d)
        .zip(inv.par_chunks_mut(ROW_TASK))
        .zip(x.par_chunks(ROW_TASK * d))
        .for_each(|((y, inv), x)| rms_rows(simd, y, inv, x, w, eps));
    (inv, y)
}

multiversion! {
    /// [`rms_forward`] of whole rows (`w.len()` wide).
    fn rms_rows(simd, y: &mut [f32], inv: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for ((y, r), x) in y.chunks_mut(d).zip(inv).zip(x.chunks(d)) {
            let ms = dot(x, x) / d as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for j in 0..d {
                y[j] = x[j] * *r * w[j];
            }
        }
    }
}

/// Backward of RMSNorm: adds `dx` into `dx_acc` and the weight gradient into `gw`.
pub(super) fn rms_backward(
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    dy: &[f32],
    d: usize,
    dx_acc: &mut [f32],
    gw: &mut [f32],
) {
    let simd = Simd::chosen();
    dx_acc
        .par_chunks_mut(ROW_TASK * d)
        .zip(x.par_chunks(ROW_TASK * d).zip(dy.par_chunks(ROW_TASK * d)))
        .zip(inv.par_chunks(ROW_TASK))
        .for_each(|((dx, (x, dy)), inv)| rms_input_grad(simd, dx, x, dy, inv, w));
    // Weight gradient: partial sums over fixed blocks of rows, added in block order.
    const BLOCK: usize = 64;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(BLOCK * d)
        .zip(dy.par_chunks(BLOCK * d))
        .zip(inv.par_chunks(BLOCK))
        .map(|((x, dy), inv)| rms_weight_grad(simd, x, dy, inv, d))
        .collect();
    for part in partials {
        for (g, p) in gw.iter_mut().zip(part) {
            *g += p;
        }
    }
}

multiversion! {
    /// `dx += ∂(x / rms · w)/∂x · dy` for whole rows (`w.len()` wide).
    fn rms_input_grad(simd, dx: &mut [f32], x: &[f32], dy: &[f32], inv: &[f32], w: &[f32]) {
        let d = w.len();
        for (((dx, x), dy), &r) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)).zip(inv) {
            let weighted: f32 = (0..d).map(|j| dy[j] * w[j] * x[j]).sum();
            let c = r * r * r * weighted / d as f32;
            for j in 0..d {
                dx[j] += r * w[j] * dy[j] - x[j] * c;
            }
        }
    }
}

multiversion! {
    /// `Σ_rows dy · x / rms`, the rows in order: one block's part of RMSNorm's weight gradient.
    fn rms_weight_grad(simd, x: &[f32], dy: &[f32], inv: &[f32], d: usize) -> Vec<f32> {
        let mut acc = vec![0.0; d];
        for ((x, dy), &r) in x.chunks(d).zip(dy.chunks(d)).zip(inv) {
            for j in 0..d {
                acc[j] += dy[j] * x[j] * r;
            }
        }
        acc
    }
}

/// SwiGLU's product, `hidden = silu(gate) · up`, over `[n, f]` rows.
pub(super) fn swiglu(hidden: &mut [f32], gate: &[f32], up: &[f32], f: usize) {
    let simd = Simd::chosen();
    hidden
        .par_chunks_mut(ROW_TASK * f)
        .zip(
            gate.par_chunks(ROW_TASK * f)
                .zip(up.par_chunks(ROW_TASK * f)),
        )
        .for_each(|(h, (g, u))| swiglu_rows(simd, h, g, u));
}

multiversion! {
    /// [`swiglu`] of one stretch of elements.
    fn swiglu_rows(simd, h: &mut [f32], g: &[f32], u: &[f32]) {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
            *h = silu(g) * u;
        }
    }
}

/// Backward of [`swiglu`] given `d_hidden`: `gate` becomes its gradient and `up` its own, in place.
pub(super) fn swiglu_backward(gate: &mut [f32], up: &mut [f32], d_hidden: &[f32], f: usize) {
    let simd = Simd::chosen();
    gate.par_chunks_mut(ROW_TASK * f)
        .zip(up.par_chunks_mut(ROW_TASK * f))
        .zip(d_hidden.par_chunks(ROW_TASK * f))
        .for_each(|((g, u), dh)| swiglu_grad_rows(simd, g, u, dh));
}

multiversion! {
    /// [`swiglu_backward`] of one stretch of elements.
    fn swiglu_grad_rows(simd, g: &mut [f32], u: &mut [f32], dh: &[f32]) {
        for ((g, u), &dh) in g.iter_mut().zip(u.iter_mut()).zip(dh) {
            let s = sigmoid(*g);
            let a = *g;
            *g = dh * *u * s * (1.0 + a * (1.0 - s));
            *u = dh * a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{exp, ln, max_of, rope_rotate, softmax_in_place, sum_exp_shifted};

    #[test]
    fn ln_is_within_two_ulps_of_the_true_logarithm() {
        let mut worst = 0.0f64;
        let mut x = 1e-44f32;
        while x < 3e38 {
            for y in [x, x * 1.000_123, x * 1.414_1, x * 1.414_4, x * 1.9999] {
                let want = (y as f64).ln();
                let got = ln(y) as f64;
                let ulp = (want.abs() as f32).max(1e-30);
                let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
                worst = worst.max((got - want).abs() / ulp);
            }
            x *= 1.37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan());
    }
    use crate::invariant::dot;

    #[test]
    fn lane_reductions_match_plain_ones_at_every_tail_length() {
        for len in 0..40 {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
                .collect();
            let ys: Vec<f32> = (0..len).map(|i| (i as f32).sin()).collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&xs), want_max, "max, length {len}");
            let want_dot: f64 = xs.iter().zip(&ys).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (dot(&xs, &ys) as f64 - want_dot).abs() < 1e-5,
                "dot, length {len}"
            );
            let want_sum: f64 = xs.iter().map(|&z| ((z - 1.0) as f64).exp()).sum();
            let got_sum = sum_exp_shifted(&xs, 1.0) as f64;
            assert!(
                (got_sum - want_sum).abs() < 1e-5 * want_sum.max(1.0),
                "sum, length {len}"
            );
            if len > 0 {
                let mut row = xs.clone();
                let lse = softmax_in_place(&mut row) as f64;
                let want_lse = want_max as f64 + (sum_exp_shifted(&xs, want_max) as f64).ln();
                assert!((lse - want_lse).abs() < 1e-5, "lse, length {len}");
                let total: f32 = row.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "softmax sums to {total}");
                for (p, z) in row.iter().zip(&xs) {
                    assert!((*p as f64 - (*z as f64 - lse).exp()).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(f32::NEG_INFINITY) >= 0.0);
        assert!(exp(f32::INFINITY).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn rope_inverse_undoes_the_rotation() {
        let (cos, sin) = ([0.6f32, 1.0, -0.28], [0.8f32, 0.0, 0.96]);
        let x = [0.5f32, -1.5, 2.0, 3.0, 0.25, -4.0];
        let mut y = x;
        rope_rotate(&mut y, &cos, &sin, false);
        // Rotating (a, b) by θ: (a cos θ − b sin θ, b cos θ + a sin θ).
        assert_eq!(y[0], 0.5 * 0.6 - 3.0 * 0.8);
        assert_eq!(y[3], 3.0 * 0.6 + 0.5 * 0.8);
        assert_eq!((y[1], y[4]), (-1.5, 0.25), "a zero angle leaves its pair");
        rope_rotate(&mut y, &cos, &sin, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
