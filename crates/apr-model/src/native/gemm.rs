//! Strided single-precision GEMM for the native learner, with the same bits on every CPU.
//!
//! Each output element is one chain of fused multiply-adds over the inner index in order:
//! `c ← fma(a[i][p], b[p][j], c)` for `p = 0, 1, …`, starting from the old value of `c`
//! (accumulate) or from zero. Blocking, tile shape, vector width and thread count only decide
//! which chains run side by side, never the order inside one, so the AVX-512 tile, the AVX2 tile
//! and the portable one (`f32::mul_add`, a true fused multiply-add on every target) give
//! identical results. The `gemm` crate this replaced sized its blocks from the cache sizes it
//! detected and summed each block from zero, so its rounding, and with it a small model's whole
//! training run, changed from one CPU to another.
//!
//! Layout is BLIS's: a block of `b` is packed into panels `NR` columns wide (or packed once for
//! many products, [`PackedB`]), and a register tile of `MR × NR` chains runs over `KC` steps of
//! the inner index before it is stored and the next block reloads it. The tile reads `a` where it
//! lies, any strides, broadcasting one element per row and step; `a` is packed into panels `MR`
//! rows tall only where a panel is partial (zero-padded). (A scale belongs to an operand: the
//! caller applies it where it computes that operand, as attention does.)

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::simd::{Isa, Simd};

/// A strided matrix view.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A row-major `rows × cols` view.
pub(super) fn rows(data: &[f32], rows: usize, cols: usize) -> Mat<'_> {
    Mat {
        data,
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

impl Mat<'_> {
    /// The transposed view (no copy).
    pub(super) fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }

    /// Element `(r, c)` (the tests' definition reads through it).
    #[cfg(test)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

/// Steps of the inner index a tile runs between loads and stores of its outputs. Any value gives
/// the same results; this one keeps a `b` panel (`KC × NR`) in L1.
const KC: usize = 256;
/// Rows and columns of output one parallel task owns at most (multiples of every `MR` / `NR`).
const MC: usize = 96;
const NC: usize = 256;
/// Tasks per thread wanted before blocks are made smaller (helps load balance).
const TASKS_PER_THREAD: usize = 4;

/// Where a tile reads its `MR` rows of `a`: element `(i, p)` at `ptr + i·row + p·step`.
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const f32,
    row: usize,
    step: usize,
}

/// A register-tile kernel: `c[i·ldc + j] (MR × NR) ← fma chains over kc steps`, loading `c`
/// first when `load`, else starting from zero.
///
/// # Safety
/// `a` addresses `MR × kc` readable floats, `b` holds `kc · NR`, and `c` points at an `MR × NR`
/// tile with row stride `ldc`, writable and aliasing neither; the CPU has the kernel's features.
type TileFn = unsafe fn(kc: usize, a: APanel, b: *const f32, c: *mut f32, ldc: usize, load: bool);

/// Columns of `simd`'s register tile, the width [`PackedB`] packs for.
fn nr(simd: Simd) -> usize {
    match simd.isa() {
        Isa::Portable | Isa::Avx2 => 16,
        Isa::Avx512 => 32,
    }
}

/// `out = a · b`, or `out += a · b` when `accumulate`; `out` is row-major.
/// `parallel` lets the rayon pool share the work (off inside per-head work that is already
/// parallel). See the module docs for the exact arithmetic.
pub(super) fn matmul(out: &mut [f32], accumulate: bool, a: Mat, b: Mat, parallel: bool) {
    matmul_with(Simd::chosen(), out, accumulate, a, b, parallel)
}

/// [`matmul`] with the register tile of a given extension.
pub(super) fn matmul_with(
    simd: Simd,
    out: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallel: bool,
) {
    assert!(b.rows == a.cols && b.fits(), "matmul shapes");
    let n = b.cols;
    solve(
        as_uninit(out),
        accumulate,
        a,
        BSource::View(b),
        n,
        simd,
        parallel,
    );
}

/// `a · b` as a new row-major vector: [`matmul`] without `accumulate`, into memory that
/// is written once instead of being zeroed first.
pub(super) fn product(a: Mat, b: Mat, parallel: bool) -> Vec<f32> {
    assert!(b.rows == a.cols && b.fits(), "matmul shapes");
    let len = a.rows * b.cols;
    let mut out = Vec::with_capacity(len);
    let fresh = &mut out.spare_capacity_mut()[..len];
    solve(
        fresh,
        false,
        a,
        BSource::View(b),
        b.cols,
        Simd::chosen(),
        parallel,
    );
    // SAFETY: a product that does not accumulate writes every element of `out` (the gemm test
    // starts each such product from garbage and compares every element with the definition).
    unsafe { out.set_len(len) };
    out
}

/// [`matmul`] against the first `cols` columns of a `b` packed beforehand: `out` is
/// `a.rows × cols`. The same bits as [`matmul`] with the view `b` was packed from.
pub(super) fn matmul_packed(
    out: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: &PackedB,
    cols: usize,
    parallel: bool,
) {
    assert!(b.rows == a.cols && cols <= b.cols, "matmul shapes");
    solve(
        as_uninit(out),
        accumulate,
        a,
        BSource::Packed(b),
        cols,
        b.simd,
        parallel,
    );
}

/// A `b` operand packed once for every product that reads it (attention's keys, which every
/// block of queries reads a prefix of): each inner block's panels, `NR` columns wide for
/// `simd`, one after another.
pub(super) struct PackedB {
    simd: Simd,
    data: Vec<f32>,
    /// The inner dimension.
    rows: usize,
    cols: usize,
}

impl PackedB {
    /// Packs `b` for the kernel [`matmul`] uses; `parallel` as for [`matmul`].
    pub(super) fn new(b: Mat, parallel: bool) -> Self {
        Self::with(Simd::chosen(), b, parallel)
    }

    fn with(simd: Simd, b: Mat, parallel: bool) -> Self {
        assert!(b.fits(), "matmul shapes");
        let nr = nr(simd);
        let panels = b.cols.div_ceil(nr);
        let mut data = vec![0.0; panels * nr * b.rows];
        // Inner blocks are packed independently: a large `b` (a weight gradient's activations)
        // would otherwise be copied by one thread while the pool waits.
        let block_len = KC * panels * nr;
        let pack = |(i, pack): (usize, &mut [f32])| {
            let inner = i * KC..i * KC + pack.len() / (panels * nr);
            match nr {
                16 => pack_b::<16>(pack, &b, inner, 0..b.cols),
                32 => pack_b::<32>(pack, &b, inner, 0..b.cols),
                _ => unreachable!("every kernel's NR is listed"),
            }
        };
        if block_len > 0 {
            if parallel && data.len() > block_len {
                data.par_chunks_mut(block_len).enumerate().for_each(pack);
            } else {
                data.chunks_mut(block_len).enumerate().for_each(pack);
            }
        }
        PackedB {
            simd,
            data,
            rows: b.rows,
            cols: b.cols,
        }
    }

    /// The panels of the inner block `p0..p0 + kc`, from column panel `jp` on.
    fn panels(&self, p0: usize, kc: usize, jp: usize) -> &[f32] {
        let nr = nr(self.simd);
        let panels = self.cols.div_ceil(nr);
        &self.data[p0 * panels * nr + jp * nr * kc..(p0 + kc) * panels * nr]
    }
}

/// The `b` of a product.
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// Packed block by block as the product runs.
    View(Mat<'a>),
    /// Packed beforehand.
    Packed(&'a PackedB),
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint blocks through it (see `Blocks::run`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// An initialised output seen as the possibly uninitialised memory [`solve`] writes.
fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; `solve` only ever writes initialised `f32`s through it, and reads
    // only elements that were initialised (the caller's, when accumulating, or its own writes).
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// A product's blocks' shared view: `out` is the caller's `a.rows × n` row-major slice, borrowed
/// mutably for the whole call (see [`solve`]).
#[derive(Clone, Copy)]
struct Blocks<'a> {
    out: SendPtr,
    accumulate: bool,
    a: Mat<'a>,
    b: BSource<'a>,
    n: usize,
}

thread_local! {
    /// Each thread's packed `a` block, packed `b` block and scratch tile, reused across calls.
    static PACKS: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// One product: checks the shapes, handles the empty cases and runs `simd`'s tiles. `out` is
/// `a.rows × n`, row-major; initialised when `accumulate`, and possibly not otherwise (every
/// element is then written before it is read).
fn solve(
    out: &mut [MaybeUninit<f32>],
    accumulate: bool,
    a: Mat,
    b: BSource,
    n: usize,
    simd: Simd,
    parallel: bool,
) {
    let (m, k) = (a.rows, a.cols);
    assert!(out.len() == m * n && a.fits(), "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(MaybeUninit::new(0.0));
        }
        return;
    }
    let blocks = Blocks {
        out: SendPtr(out.as_mut_ptr().cast()),
        accumulate,
        a,
        b,
        n,
    };
    match simd.isa() {
        Isa::Portable => blocks.run::<4, 16>(simd, tile_portable, parallel),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => blocks.run::<6, 16>(simd, tile_avx2, parallel),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => blocks.run::<8, 32>(simd, tile_avx512, parallel),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only x86-64 lists the AVX kernels as available"),
    }
}

impl Blocks<'_> {
    /// Splits the output into blocks, in parallel when asked, and runs each with `MR × NR`
    /// tiles.
    fn run<const MR: usize, const NR: usize>(&self, simd: Simd, tile: TileFn, parallel: bool) {
        let (m, n) = (self.a.rows, self.n);
        if let BSource::Packed(b) = self.b {
            assert_eq!(nr(b.simd), NR, "packed for another kernel");
        }
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        // Smaller blocks when there are too few for the threads; results do not depend on them.
        let (mut mc, mut nc) = (MC, NC);
        let tasks = |mc: usize, nc: usize| m.div_ceil(mc) * n.div_ceil(nc);
        while tasks(mc, nc) < TASKS_PER_THREAD * threads && (mc > MR || nc > NR) {
            if mc >= nc / 2 && mc > MR {
                mc = (mc / 2).div_ceil(MR) * MR;
            } else {
                nc = (nc / 2).div_ceil(NR) * NR;
            }
        }
        let blocks: Vec<Block> = (0..m)
            .step_by(mc)
            .flat_map(|i0| {
                (0..n).step_by(nc).map(move |j0| Block {
                    i0,
                    i1: (i0 + mc).min(m),
                    j0,
                    j1: (j0 + nc).min(n),
                })
            })
            .collect();
        // Every row block would pack the same columns of `b` again (a transposed weight is a
        // strided gather): pack it once for all of them.
        let packed;
        let this = match self.b {
            BSource::View(b) if m > mc => {
                packed = PackedB::with(simd, b, threads > 1);
                Blocks {
                    b: BSource::Packed(&packed),
                    ..*self
                }
            }
            _ => *self,
        };
        let run = |block: &Block| {
            PACKS.with(|packs| match packs.try_borrow_mut() {
                // SAFETY: the blocks partition the output, so no two tasks write the same
                // element.
                Ok(mut packs) => unsafe { this.block::<MR, NR>(*block, tile, &mut packs) },
                Err(_) => unsafe { this.block::<MR, NR>(*block, tile, &mut Default::default()) },
            })
        };
        if threads > 1 && blocks.len() > 1 {
            blocks.par_iter().for_each(run);
        } else {
            blocks.iter().for_each(run);
        }
    }

    /// Computes one block of the output over the whole inner dimension.
    ///
    /// # Safety
    /// No one else touches the block meanwhile.
    unsafe fn block<const MR: usize, const NR: usize>(
        &self,
        block: Block,
        tile: TileFn,
        [a_pack, b_pack, edge]: &mut [Vec<f32>; 3],
    ) {
        let (a, k, ldc) = (&self.a, self.a.cols, self.n);
        let (rows, cols) = (block.i1 - block.i0, block.j1 - block.j0);
        let (row_panels, col_panels) = (rows.div_ceil(MR), cols.div_ceil(NR));
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(a_pack, row_panels * MR * KC.min(k));
        grow(b_pack, col_panels * NR * KC.min(k));
        grow(edge, MR * NR);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            // Only a partial row panel is packed (zero-padded).
            let first_packed = rows / MR;
            let packed_rows = block.i0 + first_packed * MR..block.i1;
            pack_a::<MR>(a_pack, a, packed_rows, p0..p0 + kc);
            let b_panels: &[f32] = match self.b {
                BSource::View(b) => {
                    pack_b::<NR>(b_pack, &b, p0..p0 + kc, block.j0..block.j1);
                    b_pack
                }
                BSource::Packed(b) => b.panels(p0, kc, block.j0 / NR),
            };
            let load = self.accumulate || p0 > 0;
            for jp in 0..col_panels {
                let b_panel = b_panels[jp * NR * kc..].as_ptr();
                let (j, width) = (block.j0 + jp * NR, NR.min(cols - jp * NR));
                for ip in 0..row_panels {
                    let (i, height) = (block.i0 + ip * MR, MR.min(rows - ip * MR));
                    let panel = if ip >= first_packed {
                        APanel {
                            ptr: a_pack[(ip - first_packed) * MR * kc..].as_ptr(),
                            row: 1,
                            step: MR,
                        }
                    } else {
                        APanel {
                            ptr: a.data[i * a.row_stride + p0 * a.col_stride..].as_ptr(),
                            row: a.row_stride,
                            step: a.col_stride,
                        }
                    };
                    let c = self.out.0.add(i * ldc + j);
                    if height == MR && width == NR {
                        tile(kc, panel, b_panel, c, ldc, load);
                        continue;
                    }
                    // A partial tile runs on a full scratch tile; the padding's chains are
                    // zeros and are dropped.
                    for r in 0..height {
                        for (q, e) in edge[r * NR..r * NR + width].iter_mut().enumerate() {
                            *e = if load { *c.add(r * ldc + q) } else { 0.0 };
                        }
                    }
                    tile(kc, panel, b_panel, edge.as_mut_ptr(), NR, load);
                    for r in 0..height {
                        for (q, e) in edge[r * NR..r * NR + width].iter().enumerate() {
                            *c.add(r * ldc + q) = *e;
                        }
                    }
                }
            }
        }
    }
}

/// Output rows `i0..i1` and columns `j0..j1`.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
}

/// The panels of `N` rows (or columns) covering `range`, each `kc` steps of `N` values in
/// `pack`: (first index, how many are real, the steps).
fn panels<const N: usize>(
    pack: &mut [f32],
    kc: usize,
    range: Range<usize>,
) -> impl Iterator<Item = (usize, usize, &mut [[f32; N]])> {
    let end = range.end;
    pack.chunks_exact_mut(N * kc)
        .zip(range.step_by(N))
        .map(move |(dst, start)| (start, N.min(end - start), dst.as_chunks_mut::<N>().0))
}

/// Packs `a[rows][inner]` as panels of `MR` rows, each stored inner step by inner step
/// (`MR` values a step), zero-padded to whole panels.
fn pack_a<const MR: usize>(pack: &mut [f32], a: &Mat, rows: Range<usize>, inner: Range<usize>) {
    let kc = inner.len();
    for (r0, height, steps) in panels::<MR>(pack, kc, rows) {
        if a.row_stride == 1 {
            // A transposed view: each inner step's rows are contiguous.
            for (s, step) in steps.iter_mut().enumerate() {
                let base = (inner.start + s) * a.col_stride + r0;
                step[..height].copy_from_slice(&a.data[base..base + height]);
                step[height..].fill(0.0);
            }
            continue;
        }
        for r in 0..MR {
            if r >= height {
                steps.iter_mut().for_each(|step| step[r] = 0.0);
                continue;
            }
            let base = (r0 + r) * a.row_stride + inner.start * a.col_stride;
            let src = &a.data[base..];
            if a.col_stride == 1 {
                for (step, &v) in steps.iter_mut().zip(&src[..kc]) {
                    step[r] = v;
                }
            } else {
                for (s, step) in steps.iter_mut().enumerate() {
                    step[r] = src[s * a.col_stride];
                }
            }
        }
    }
}

/// Packs `b[inner][cols]` as panels of `NR` columns, each stored inner step by inner step,
/// zero-padded to whole panels.
fn pack_b<const NR: usize>(pack: &mut [f32], b: &Mat, inner: Range<usize>, cols: Range<usize>) {
    let kc = inner.len();
    for (c0, width, steps) in panels::<NR>(pack, kc, cols) {
        if b.row_stride == 1 && b.col_stride != 1 {
            // A transposed view: each column is contiguous; read it whole.
            for c in 0..NR {
                if c >= width {
                    steps.iter_mut().for_each(|step| step[c] = 0.0);
                    continue;
                }
                let base = (c0 + c) * b.col_stride + inner.start;
                for (step, &x) in steps.iter_mut().zip(&b.data[base..base + kc]) {
                    step[c] = x;
                }
            }
            continue;
        }
        for (s, step) in steps.iter_mut().enumerate() {
            let base = (inner.start + s) * b.row_stride + c0 * b.col_stride;
            if b.col_stride == 1 && width == NR {
                step.copy_from_slice(&b.data[base..base + NR]);
            } else {
                for (c, v) in step.iter_mut().enumerate() {
                    *v = if c < width {
                        b.data[base + c * b.col_stride]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// The portable tile: 4 × 16 chains of `f32::mul_add`.
///
/// # Safety
/// As [`TileFn`].
unsafe fn tile_portable(kc: usize, a: APanel, b: *const f32, c: *mut f32, ldc: usize, load: bool) {
    const MR: usize = 4;
    const NR: usize = 16;
    let b = std::slice::from_raw_parts(b, kc * NR);
    let mut acc = [[0.0f32; NR]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(std::slice::from_raw_parts(c.add(i * ldc), NR));
        }
    }
    for (p, b_step) in b.chunks_exact(NR).enumerate() {
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = *a.ptr.add(i * a.row + p * a.step);
            for (acc, &bj) in row.iter_mut().zip(b_step) {
                *acc = ai.mul_add(bj, *acc);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        std::slice::from_raw_parts_mut(c.add(i * ldc), NR).copy_from_slice(row);
    }
}

/// An x86 tile of `$mr` rows × two vectors of `$lanes`, one fused multiply-add per accumulator
/// and step: written once for both vector widths, with the width's intrinsics passed in.
macro_rules! x86_tile {
    ($(#[$doc:meta])* $name:ident, $features:literal, $mr:literal, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`TileFn`].
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            kc: usize,
            a: APanel,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            load: bool,
        ) {
            use std::arch::x86_64::*;
            const MR: usize = $mr;
            const NR: usize = 2 * $lanes;
            let mut acc = [[$zero(); 2]; MR];
            if load {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = $load(c.add(i * ldc));
                    row[1] = $load(c.add(i * ldc + $lanes));
                }
            }
            let a_rows: [*const f32; MR] = std::array::from_fn(|i| a.ptr.add(i * a.row));
            for p in 0..kc {
                let b0 = $load(b.add(p * NR));
                let b1 = $load(b.add(p * NR + $lanes));
                let at = p * a.step;
                for (row, a_row) in acc.iter_mut().zip(a_rows) {
                    let ai = $splat(*a_row.add(at));
                    row[0] = $fma(ai, b0, row[0]);
                    row[1] = $fma(ai, b1, row[1]);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                $store(c.add(i * ldc), row[0]);
                $store(c.add(i * ldc + $lanes), row[1]);
            }
        }
    };
}

x86_tile!(
    /// The AVX2 tile: 6 rows × 2 vectors of 8.
    tile_avx2, "avx2,fma", 6, 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
    _mm256_fmadd_ps
);
x86_tile!(
    /// The AVX-512 tile: 8 rows × 2 vectors of 16.
    tile_avx512, "avx512f", 8, 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
    _mm512_fmadd_ps
);

#[cfg(test)]
mod tests {
    use super::{matmul_packed, matmul_with, product, rows, Mat, PackedB};
    use crate::simd::Simd;

    /// A small deterministic generator of values with full mantissas.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    fn same_bits(x: &[f32], y: &[f32]) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// The definition: one fused multiply-add chain per element, inner index in order.
    fn reference(out: &mut [f32], accumulate: bool, a: Mat, b: Mat) {
        for i in 0..a.rows {
            for j in 0..b.cols {
                let o = &mut out[i * b.cols + j];
                let mut c = if accumulate { *o } else { 0.0 };
                for p in 0..a.cols {
                    c = a.at(i, p).mul_add(b.at(p, j), c);
                }
                *o = c;
            }
        }
    }

    #[test]
    fn every_extensions_tile_gives_the_definitions_bits_at_every_shape_and_layout() {
        let extensions = Simd::available();
        // Edges of every tile (4, 6, 8 rows; 16, 32 columns), the inner block (256) and the
        // task blocks (96 × 256) crossed, with each operand row-major and transposed.
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (13, 33, 17),
            (97, 40, 300),
            (25, 257, 513),
            (200, 31, 64),
        ];
        for &(m, n, k) in &shapes {
            let (a_data, b_data) = (values(m * k, 1), values(k * n, 2));
            let start = values(m * n, 3);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta {
                    rows(&a_data, k, m).t()
                } else {
                    rows(&a_data, m, k)
                };
                let b = if tb {
                    rows(&b_data, n, k).t()
                } else {
                    rows(&b_data, k, n)
                };
                for accumulate in [false, true] {
                    let mut want = start.clone();
                    reference(&mut want, accumulate, a, b);
                    for &simd in &extensions {
                        for parallel in [false, true] {
                            let mut got = start.clone();
                            matmul_with(simd, &mut got, accumulate, a, b, parallel);
                            assert!(
                                same_bits(&got, &want),
                                "{} parallel={parallel} m={m} n={n} k={k} \
                                 transposed=({ta},{tb}) accumulate={accumulate}",
                                simd.name()
                            );
                        }
                        if !accumulate && simd == Simd::chosen() {
                            let got = product(a, b, true);
                            assert!(
                                same_bits(&got, &want),
                                "product m={m} n={n} k={k} transposed=({ta},{tb})"
                            );
                        }
                        // Packed once (by the pool or by one thread: the same panels), then
                        // read whole or by a prefix of its columns.
                        let packed = PackedB::with(simd, b, true);
                        let serial = PackedB::with(simd, b, false);
                        assert!(same_bits(&packed.data, &serial.data), "packed in parallel");
                        for cols in [n, n.div_ceil(2), 1] {
                            let mut want = start[..m * cols].to_vec();
                            reference(&mut want, accumulate, a, Mat { cols, ..b });
                            let mut got = start[..m * cols].to_vec();
                            matmul_packed(&mut got, accumulate, a, &packed, cols, true);
                            assert!(
                                same_bits(&got, &want),
                                "{} packed, {cols} of {n} columns: m={m} k={k} \
                                 transposed=({ta},{tb}) accumulate={accumulate}",
                                simd.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (m, n, k) = (300, 200, 600);
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0; m * n];
            pool.install(|| {
                matmul_with(
                    Simd::chosen(),
                    &mut out,
                    false,
                    rows(&a, m, k),
                    rows(&b, k, n),
                    true,
                )
            });
            out
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(same_bits(&run(threads), &one));
        }
    }

    #[test]
    fn an_empty_inner_dimension_zeroes_or_keeps_the_output() {
        let (a, b) = (vec![], vec![]);
        let mut out = vec![1.5; 6];
        for (accumulate, want) in [(true, 1.5), (false, 0.0)] {
            let (a, b) = (rows(&a, 2, 0), rows(&b, 0, 3));
            matmul_with(Simd::PORTABLE, &mut out, accumulate, a, b, true);
            assert_eq!(out, vec![want; 6], "accumulate={accumulate}");
        }
    }
}
