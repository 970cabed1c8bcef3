//! Causal attention over packed sequences for training, flash-style: query rows in blocks
//! that see only the keys up to their last row, each row's log-sum-exp kept so that the backward
//! pass recomputes probabilities instead of storing them (the tape grows linearly with length).
//! Tensors are head-major, `[h, n, hd]`; every (head, sequence) is one parallel unit.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{matmul, matmul_packed, rows, PackedB};
use super::kernels::{exp, softmax_in_place, split_rows, zeros};
use crate::invariant::dot;
use crate::simd::{multiversion, Simd};

/// Causal attention of every (head, sequence): output `[h, n, hd]` and row log-sum-exps.
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bounds: &[usize],
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let n = *bounds.last().unwrap_or(&0);
    let mut out = zeros(q.len());
    let mut lse = vec![0.0; q.len() / hd.max(1)];
    out.par_chunks_mut(n * hd)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(head, (o_plane, l_plane))| {
            let units: Vec<_> = split_rows(o_plane, bounds, hd)
                .into_iter()
                .zip(split_rows(l_plane, bounds, 1))
                .zip(bounds.windows(2))
                .collect();
            units.into_par_iter().for_each(|((o, l), w)| {
                Unit::at(q, k, v, span(head, n, hd, w), hd).forward(o, l);
            });
        });
    (out, lse)
}

/// Gradients of causal attention for every (head, sequence), probabilities recomputed from
/// the saved log-sum-exps. All tensors head-major.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    bounds: &[usize],
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = *bounds.last().unwrap_or(&0);
    let mut dq = zeros(q.len());
    let mut dk = zeros(q.len());
    let mut dv = zeros(q.len());
    dq.par_chunks_mut(n * hd)
        .zip(dk.par_chunks_mut(n * hd))
        .zip(dv.par_chunks_mut(n * hd))
        .enumerate()
        .for_each(|(head, ((dq_plane, dk_plane), dv_plane))| {
            let units: Vec<_> = split_rows(dq_plane, bounds, hd)
                .into_iter()
                .zip(split_rows(dk_plane, bounds, hd))
                .zip(split_rows(dv_plane, bounds, hd))
                .zip(bounds.windows(2))
                .collect();
            units.into_par_iter().for_each(|(((dq, dk), dv), w)| {
                let part = span(head, n, hd, w);
                let unit = Unit::at(q, k, v, part.clone(), hd);
                let grads = UnitGrads { dq, dk, dv };
                let lse = &lse[head * n + w[0]..head * n + w[1]];
                unit.backward(&o[part.clone()], &d_o[part], lse, grads);
            });
        });
    (dq, dk, dv)
}

/// Where head `head`'s rows of the sequence at packed positions `w[0]..w[1]` sit in a
/// head-major `[h, n, hd]` tensor.
fn span(head: usize, n: usize, hd: usize, w: &[usize]) -> Range<usize> {
    head * n * hd + w[0] * hd..head * n * hd + w[1] * hd
}

/// Query rows handled together: each block attends only to the keys up to its last row, so the
/// masked half of the score matrix is (mostly) never computed.
const QUERY_BLOCK: usize = 64;

/// One head of one sequence: `[t, hd]` queries, keys and values.
///
/// The score scale `1/√hd` belongs to an operand of the products: it multiplies the queries
/// once, and `dS` as it is computed (the bits of scaling each element as a product reads it).
struct Unit<'a> {
    q: &'a [f32],
    /// `q · 1/√hd`.
    q_scaled: Vec<f32>,
    k: &'a [f32],
    v: &'a [f32],
    hd: usize,
}

/// Where [`Unit::backward`] writes (`dk`, `dv` accumulate over query blocks; all start at 0).
struct UnitGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl<'a> Unit<'a> {
    /// The unit at `part` of head-major `q`, `k`, `v` (see [`span`]).
    fn at(q: &'a [f32], k: &'a [f32], v: &'a [f32], part: Range<usize>, hd: usize) -> Self {
        let q = &q[part.clone()];
        let scale = Unit::scale(hd);
        Unit {
            q,
            q_scaled: q.iter().map(|&x| x * scale).collect(),
            k: &k[part.clone()],
            v: &v[part],
            hd,
        }
    }

    fn scale(hd: usize) -> f32 {
        1.0 / (hd as f32).sqrt()
    }

    fn len(&self) -> usize {
        self.q.len() / self.hd
    }

    /// `kᵀ` or `vᵀ` packed once: every query block reads a prefix of its columns.
    fn packed_t(&self, m: &[f32]) -> PackedB {
        PackedB::new(rows(m, self.len(), self.hd).t(), false)
    }

    /// A block's scratch rows, allocated once per unit: every element a product writes is
    /// overwritten, so no block pays for zeroing its own.
    fn scratch(&self) -> Vec<f32> {
        vec![0.0; QUERY_BLOCK.min(self.len()) * self.len()]
    }

    /// Probabilities of query rows `i0..i1` over keys `0..i1` (`[i1 − i0, i1]`, into the front of
    /// `scratch`): softmax of the scaled scores, from the row log-sum-exps when given, else
    /// computing them into `lse`.
    fn probs<'s>(
        &self,
        keys_t: &PackedB,
        (i0, i1): (usize, usize),
        lse: Result<&[f32], &mut [f32]>,
        scratch: &'s mut [f32],
    ) -> &'s mut [f32] {
        let hd = self.hd;
        let p = &mut scratch[..(i1 - i0) * i1];
        let queries = rows(&self.q_scaled[i0 * hd..i1 * hd], i1 - i0, hd);
        matmul_packed(p, false, queries, keys_t, i1, false);
        normalise(Simd::chosen(), p, i1, i0, lse);
        p
    }

    /// `out = softmax(q kᵀ / √hd, causal) v` and the row log-sum-exps.
    fn forward(&self, out: &mut [f32], lse: &mut [f32]) {
        let (t, hd) = (self.len(), self.hd);
        let keys_t = self.packed_t(self.k);
        let mut scratch = self.scratch();
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let p = self.probs(&keys_t, (i0, i1), Err(&mut *lse), &mut scratch);
            let values = rows(&self.v[..i1 * hd], i1, hd);
            matmul(
                &mut out[i0 * hd..i1 * hd],
                false,
                rows(p, i1 - i0, i1),
                values,
                false,
            );
        }
    }

    /// Gradients given the output `o`, its gradient `d_o` and the saved log-sum-exps.
    fn backward(&self, o: &[f32], d_o: &[f32], lse: &[f32], g: UnitGrads) {
        let (t, hd) = (self.len(), self.hd);
        let scale = Unit::scale(hd);
        let (keys_t, values_t) = (self.packed_t(self.k), self.packed_t(self.v));
        let (mut p_scratch, mut ds_scratch) = (self.scratch(), self.scratch());
        let delta: Vec<f32> = d_o
            .chunks(hd)
            .zip(o.chunks(hd))
            .map(|(g, y)| dot(g, y))
            .collect();
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let b = i1 - i0;
            let p = self.probs(&keys_t, (i0, i1), Ok(lse), &mut p_scratch);
            let d_out = rows(&d_o[i0 * hd..i1 * hd], b, hd);
            matmul(&mut g.dv[..i1 * hd], true, rows(p, b, i1).t(), d_out, false);
            let ds = &mut ds_scratch[..b * i1];
            matmul_packed(ds, false, d_out, &values_t, i1, false);
            score_grads(Simd::chosen(), ds, p, i1, &delta[i0..i1], scale);
            let keys = rows(&self.k[..i1 * hd], i1, hd);
            matmul(
                &mut g.dq[i0 * hd..i1 * hd],
                false,
                rows(ds, b, i1),
                keys,
                false,
            );
            let queries = rows(&self.q[i0 * hd..i1 * hd], b, hd);
            matmul(
                &mut g.dk[..i1 * hd],
                true,
                rows(ds, b, i1).t(),
                queries,
                false,
            );
        }
    }
}

multiversion! {
    /// Scaled scores → probabilities, in place, for the `[rows, width]` block `p` whose row `r`
    /// is query `i0 + r` and sees keys `0..=i0 + r`: each visible score exponentiated against the
    /// saved log-sum-exp (`Ok`), or soft-maxed with its log-sum-exp written (`Err`); masked
    /// scores become 0.
    fn normalise(simd, p: &mut [f32], width: usize, i0: usize, lse: Result<&[f32], &mut [f32]>) {
        let mut lse = lse;
        for (r, row) in p.chunks_mut(width).enumerate() {
            let visible = i0 + r + 1;
            match &mut lse {
                Ok(saved) => {
                    let log_norm = saved[i0 + r];
                    for z in &mut row[..visible] {
                        *z = exp(*z - log_norm);
                    }
                }
                Err(out) => out[i0 + r] = softmax_in_place(&mut row[..visible]),
            }
            row[visible..].fill(0.0);
        }
    }
}

multiversion! {
    /// `dS · scale = P ∘ (dP − δ) · scale` in place of `dP`, for the `[rows, width]` blocks
    /// `ds` and `p`, with each row's `δ = dO · O` (`dS` rounded before it is scaled).
    fn score_grads(simd, ds: &mut [f32], p: &[f32], width: usize, delta: &[f32], scale: f32) {
        for ((drow, prow), &d) in ds.chunks_mut(width).zip(p.chunks(width)).zip(delta) {
            for (dz, &pz) in drow.iter_mut().zip(prow) {
                *dz = pz * (*dz - d) * scale;
            }
        }
    }
}
