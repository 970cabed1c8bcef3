// Causal flash attention for bf16 `[b·h, s, HD]` tensors, forward and backward, on tensor cores
// through `nvcuda::wmma` (16 × 16 × 16 bf16 products, f32 accumulation).
//
// No `[s, s]` score matrix is ever stored: the forward keeps a running max and sum per query row
// and saves the row's log-sum-exp; the backward recomputes the probabilities from it, tile by
// tile. The backward is two kernels, one owning a tile of keys (dK, dV) and one a tile of queries
// (dQ), so no gradient is summed with atomics and every run gives the same bits.
//
// A block is four warps; a warp owns 16 rows of its block's 64-row tile. Products go through
// shared memory (fragments are stored and reloaded rather than read element by element), so the
// code depends on no fragment layout. Row-wise work (masking, softmax statistics, rescaling) is
// done by two lanes a row, each over half of its columns (lanes 2r and 2r + 1 hold row r).
//
// Compiled at run time by NVRTC (`fast_ops/flash.rs`) for the device's architecture (sm_80 or
// newer: bf16 wmma); the same source also compiles for the host against the test suite's CUDA
// emulator (`tests/cuda_emulator`, `APR_CUDA_EMULATOR`), where its results are checked against
// burn's attention.

#ifndef APR_CUDA_EMULATOR
#include <cuda_bf16.h>
#include <mma.h>
#define APR_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
// NVRTC has no <cmath>.
#define INFINITY __int_as_float(0x7f800000)
#endif

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define APR_WARPS 4
#define APR_THREADS (APR_WARPS * 32)
// Query rows of a block (16 a warp) and keys of a tile.
#define APR_TILE 64
// Row padding, in elements, that keeps every row 32-byte aligned (wmma's requirement) while
// shifting rows across shared-memory banks.
#define APR_PAD_H 8
#define APR_PAD_F 4
// Columns of a tile each of a row's two lanes takes.
#define APR_HALF (APR_TILE / 2)

namespace apr_flash {

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> RowA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> RowB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> ColB;

// Leading dimensions of the shared tiles.
template <int HD> struct Ld {
    static const int h = HD + APR_PAD_H;       // bf16 [row][HD] tiles
    static const int s = APR_TILE + APR_PAD_F; // f32 [16][keys] scores
    static const int p = APR_TILE + APR_PAD_H; // bf16 [16][keys] probabilities
};

// Copies rows `row0 .. row0 + 64` of a `[seq, HD]` matrix into a shared tile, 16 bytes a load;
// rows past `seq` become zeros.
template <int HD>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int row0, int seq) {
    const int chunks = HD / 8; // 8 bf16 in 16 bytes
    for (int i = threadIdx.x; i < APR_TILE * chunks; i += APR_THREADS) {
        const int r = i / chunks, c = i % chunks;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < seq) v = reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * HD)[c];
        reinterpret_cast<uint4*>(dst + r * Ld<HD>::h)[c] = v;
    }
}

// out[16][64] (f32, leading dimension Ld::s) = a[16][HD] · b[64][HD]ᵀ, both bf16 tiles in shared
// memory with leading dimension Ld::h.
template <int HD>
__device__ __forceinline__ void rows_times_rows_t(float* out, const bf16* a, const bf16* b) {
#pragma unroll
    for (int nt = 0; nt < APR_TILE / 16; ++nt) {
        Acc acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            RowA fa;
            ColB fb;
            wmma::load_matrix_sync(fa, a + 16 * kk, Ld<HD>::h);
            wmma::load_matrix_sync(fb, b + 16 * nt * Ld<HD>::h + 16 * kk, Ld<HD>::h);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + 16 * nt, acc, Ld<HD>::s, wmma::mem_row_major);
    }
}

// acc[dt] += p[16][64] · b[64][HD] for each 16-column slice dt, with p bf16 (leading dimension
// Ld::p) and b a bf16 tile (Ld::h).
template <int HD>
__device__ __forceinline__ void accumulate_times(Acc* acc, const bf16* p, const bf16* b) {
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) {
#pragma unroll
        for (int kk = 0; kk < APR_TILE / 16; ++kk) {
            RowA fa;
            RowB fb;
            wmma::load_matrix_sync(fa, p + 16 * kk, Ld<HD>::p);
            wmma::load_matrix_sync(fb, b + 16 * kk * Ld<HD>::h + 16 * dt, Ld<HD>::h);
            wmma::mma_sync(acc[dt], fa, fb, acc[dt]);
        }
    }
}

// Writes a warp's 16 × HD accumulators, times `scale`, as bf16 rows `row0 ..` of `[seq, HD]`,
// staging each 16 × 16 slice through `stage` (f32, leading dimension Ld::s).
template <int HD>
__device__ __forceinline__ void store_rows(bf16* dst, Acc* acc, float* stage, int row0, int seq,
                                           float scale) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) {
        wmma::store_matrix_sync(stage, acc[dt], Ld<HD>::s, wmma::mem_row_major);
        __syncwarp();
        const int r = lane / 2, c0 = 8 * (lane % 2);
        if (row0 + r < seq) {
            bf16* row = dst + (size_t)(row0 + r) * HD + 16 * dt;
            for (int c = c0; c < c0 + 8; ++c) row[c] = __float2bfloat16(stage[r * Ld<HD>::s + c] * scale);
        }
        __syncwarp();
    }
}

// Shared memory of the forward, in bytes (the launcher's formula in `flash.rs` must agree).
template <int HD> struct ForwardSmem {
    static const int bytes = 3 * APR_TILE * Ld<HD>::h * 2 + APR_WARPS * 16 * Ld<HD>::s * 4 +
                             APR_WARPS * 16 * Ld<HD>::p * 2 + APR_WARPS * 16 * (HD + APR_PAD_F) * 4;
};

// out = softmax(q kᵀ · scale + causal mask) v and lse = each row's log-sum-exp of its scaled,
// masked scores. Grid: (⌈seq / 64⌉, b·h).
template <int HD>
__device__ void forward(const bf16* __restrict__ q, const bf16* __restrict__ k,
                        const bf16* __restrict__ v, bf16* __restrict__ out, float* __restrict__ lse,
                        int seq, float scale) {
    APR_SHARED(smem);
    const int ldo = HD + APR_PAD_F;
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* ks = qs + APR_TILE * Ld<HD>::h;
    bf16* vs = ks + APR_TILE * Ld<HD>::h;
    float* ss = reinterpret_cast<float*>(vs + APR_TILE * Ld<HD>::h);
    bf16* ps = reinterpret_cast<bf16*>(ss + APR_WARPS * 16 * Ld<HD>::s);
    float* os = reinterpret_cast<float*>(ps + APR_WARPS * 16 * Ld<HD>::p);

    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = blockIdx.x * APR_TILE;
    const size_t base = (size_t)blockIdx.y * seq * HD;
    q += base;
    k += base;
    v += base;
    out += base;
    lse += (size_t)blockIdx.y * seq;
    float* s_w = ss + w * 16 * Ld<HD>::s;
    bf16* p_w = ps + w * 16 * Ld<HD>::p;
    float* o_w = os + w * 16 * ldo;
    // The row this lane works on, with the other lane of the pair, and its half of the columns.
    const int r = lane / 2, half = lane % 2;
    const int row = q0 + 16 * w + r;

    load_tile<HD>(qs, q, q0, seq);
    for (int i = lane; i < 16 * ldo; i += 32) o_w[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    // Keys up to the block's last query; the tiles are block-uniform, so every thread reaches
    // every barrier.
    const int kv_end = min(seq, q0 + APR_TILE);
    for (int k0 = 0; k0 < kv_end; k0 += APR_TILE) {
        __syncthreads(); // the previous tile's readers are done
        load_tile<HD>(ks, k, k0, seq);
        load_tile<HD>(vs, v, k0, seq);
        __syncthreads();
        rows_times_rows_t<HD>(s_w, qs + 16 * w * Ld<HD>::h, ks);
        __syncwarp();
        {
            float* srow = s_w + r * Ld<HD>::s;
            // The last key this row sees, relative to the tile (rows past `seq` see every key).
            const int last = min(row, seq - 1) - k0;
            float mx = m;
            for (int j = half * APR_HALF; j < (half + 1) * APR_HALF; ++j) {
                const float x = j <= last ? srow[j] * scale : -INFINITY;
                srow[j] = x;
                mx = fmaxf(mx, x);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            // A row's first tile always holds key 0, so `mx` is finite from then on.
            const float alpha = mx == -INFINITY ? 1.0f : expf(m - mx);
            bf16* prow = p_w + r * Ld<HD>::p;
            float sum = 0.0f;
            for (int j = half * APR_HALF; j < (half + 1) * APR_HALF; ++j) {
                const float p = srow[j] == -INFINITY ? 0.0f : expf(srow[j] - mx);
                sum += p;
                prow[j] = __float2bfloat16(p);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            l = l * alpha + sum;
            m = mx;
            float* orow = o_w + r * ldo;
            for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); ++d) orow[d] *= alpha;
        }
        __syncwarp();
        // O_w += P_w · V, the accumulators reloaded from and stored back to shared memory.
        Acc acc[HD / 16];
#pragma unroll
        for (int dt = 0; dt < HD / 16; ++dt)
            wmma::load_matrix_sync(acc[dt], o_w + 16 * dt, ldo, wmma::mem_row_major);
        accumulate_times<HD>(acc, p_w, vs);
#pragma unroll
        for (int dt = 0; dt < HD / 16; ++dt)
            wmma::store_matrix_sync(o_w + 16 * dt, acc[dt], ldo, wmma::mem_row_major);
        __syncwarp();
    }
    if (row < seq) {
        const float inv = 1.0f / l;
        const float* orow = o_w + r * ldo;
        bf16* dst = out + (size_t)row * HD;
        for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); ++d)
            dst[d] = __float2bfloat16(orow[d] * inv);
        if (half == 0) lse[row] = m + logf(l);
    }
}

// Shared memory of each backward kernel, in bytes (the launcher's formula must agree).
template <int HD> struct BackwardSmem {
    static const int bytes = 4 * APR_TILE * Ld<HD>::h * 2 + 2 * APR_WARPS * 16 * Ld<HD>::s * 4 +
                             2 * APR_WARPS * 16 * Ld<HD>::p * 2 + 2 * APR_TILE * 4;
};

// The probability and score gradient of one (key, query) pair, from the recomputed score, the
// query's log-sum-exp and delta (rowsum(dO ∘ O)): p = exp(s·scale − lse), ds = p (dp − delta).
__device__ __forceinline__ void score_grad(float s, float dp, float lse, float delta, bool seen,
                                           float scale, bf16* p_out, bf16* ds_out) {
    const float p = seen ? expf(s * scale - lse) : 0.0f;
    *p_out = __float2bfloat16(p);
    *ds_out = __float2bfloat16(p * (dp - delta));
}

// dK and dV for a tile of 64 keys (16 a warp), over every query tile at or after it.
// Grid: (⌈seq / 64⌉, b·h).
template <int HD>
__device__ void backward_kv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            bf16* __restrict__ dk, bf16* __restrict__ dv, int seq, float scale) {
    APR_SHARED(smem);
    bf16* ks = reinterpret_cast<bf16*>(smem);
    bf16* vs = ks + APR_TILE * Ld<HD>::h;
    bf16* qs = vs + APR_TILE * Ld<HD>::h;
    bf16* dos = qs + APR_TILE * Ld<HD>::h;
    float* st = reinterpret_cast<float*>(dos + APR_TILE * Ld<HD>::h);
    float* dpt = st + APR_WARPS * 16 * Ld<HD>::s;
    bf16* pt = reinterpret_cast<bf16*>(dpt + APR_WARPS * 16 * Ld<HD>::s);
    bf16* dst = pt + APR_WARPS * 16 * Ld<HD>::p;
    float* lse_s = reinterpret_cast<float*>(dst + APR_WARPS * 16 * Ld<HD>::p);
    float* delta_s = lse_s + APR_TILE;

    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j0 = blockIdx.x * APR_TILE;
    const size_t base = (size_t)blockIdx.y * seq * HD;
    q += base;
    k += base;
    v += base;
    dout += base;
    dk += base;
    dv += base;
    lse += (size_t)blockIdx.y * seq;
    delta += (size_t)blockIdx.y * seq;
    float* st_w = st + w * 16 * Ld<HD>::s;
    float* dpt_w = dpt + w * 16 * Ld<HD>::s;
    bf16* pt_w = pt + w * 16 * Ld<HD>::p;
    bf16* dst_w = dst + w * 16 * Ld<HD>::p;
    // The key this lane works on, with the other lane of the pair, and its half of the queries.
    const int r = lane / 2, half = lane % 2;
    const int key = j0 + 16 * w + r;

    load_tile<HD>(ks, k, j0, seq);
    load_tile<HD>(vs, v, j0, seq);
    Acc dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) {
        wmma::fill_fragment(dk_acc[dt], 0.0f);
        wmma::fill_fragment(dv_acc[dt], 0.0f);
    }
    for (int i0 = j0; i0 < seq; i0 += APR_TILE) {
        __syncthreads();
        load_tile<HD>(qs, q, i0, seq);
        load_tile<HD>(dos, dout, i0, seq);
        for (int i = threadIdx.x; i < APR_TILE; i += APR_THREADS) {
            const bool in = i0 + i < seq;
            lse_s[i] = in ? lse[i0 + i] : 0.0f;
            delta_s[i] = in ? delta[i0 + i] : 0.0f;
        }
        __syncthreads();
        // Sᵀ_w = K_w Qᵀ and dPᵀ_w = V_w dOᵀ: [16 keys × 64 queries].
        rows_times_rows_t<HD>(st_w, ks + 16 * w * Ld<HD>::h, qs);
        rows_times_rows_t<HD>(dpt_w, vs + 16 * w * Ld<HD>::h, dos);
        __syncwarp();
        for (int j = half * APR_HALF; j < (half + 1) * APR_HALF; ++j) {
            const int query = i0 + j;
            score_grad(st_w[r * Ld<HD>::s + j], dpt_w[r * Ld<HD>::s + j], lse_s[j], delta_s[j],
                       key <= query && query < seq && key < seq, scale, pt_w + r * Ld<HD>::p + j,
                       dst_w + r * Ld<HD>::p + j);
        }
        __syncwarp();
        // dV_w += Pᵀ_w dO and dK_w += dSᵀ_w Q (scaled at the end).
        accumulate_times<HD>(dv_acc, pt_w, dos);
        accumulate_times<HD>(dk_acc, dst_w, qs);
    }
    // The score buffers are free now: stage the results through them.
    __syncwarp();
    store_rows<HD>(dk, dk_acc, st_w, j0 + 16 * w, seq, scale);
    store_rows<HD>(dv, dv_acc, st_w, j0 + 16 * w, seq, 1.0f);
}

// dQ for a tile of 64 queries (16 a warp), over every key tile up to its last query.
// Grid: (⌈seq / 64⌉, b·h).
template <int HD>
__device__ void backward_q(const bf16* __restrict__ q, const bf16* __restrict__ k,
                           const bf16* __restrict__ v, const bf16* __restrict__ dout,
                           const float* __restrict__ lse, const float* __restrict__ delta,
                           bf16* __restrict__ dq, int seq, float scale) {
    APR_SHARED(smem);
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* dos = qs + APR_TILE * Ld<HD>::h;
    bf16* ks = dos + APR_TILE * Ld<HD>::h;
    bf16* vs = ks + APR_TILE * Ld<HD>::h;
    float* ss = reinterpret_cast<float*>(vs + APR_TILE * Ld<HD>::h);
    float* dps = ss + APR_WARPS * 16 * Ld<HD>::s;
    bf16* ps = reinterpret_cast<bf16*>(dps + APR_WARPS * 16 * Ld<HD>::s);
    bf16* dss = ps + APR_WARPS * 16 * Ld<HD>::p;

    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i0 = blockIdx.x * APR_TILE;
    const size_t base = (size_t)blockIdx.y * seq * HD;
    q += base;
    k += base;
    v += base;
    dout += base;
    dq += base;
    lse += (size_t)blockIdx.y * seq;
    delta += (size_t)blockIdx.y * seq;
    float* s_w = ss + w * 16 * Ld<HD>::s;
    float* dp_w = dps + w * 16 * Ld<HD>::s;
    bf16* p_w = ps + w * 16 * Ld<HD>::p;
    bf16* ds_w = dss + w * 16 * Ld<HD>::p;
    // The query this lane works on, with the other lane of the pair, and its half of the keys.
    const int r = lane / 2, half = lane % 2;
    const int row = i0 + 16 * w + r;
    const float row_lse = row < seq ? lse[row] : 0.0f;
    const float row_delta = row < seq ? delta[row] : 0.0f;

    load_tile<HD>(qs, q, i0, seq);
    load_tile<HD>(dos, dout, i0, seq);
    Acc dq_acc[HD / 16];
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) wmma::fill_fragment(dq_acc[dt], 0.0f);
    const int kv_end = min(seq, i0 + APR_TILE);
    for (int k0 = 0; k0 < kv_end; k0 += APR_TILE) {
        __syncthreads();
        load_tile<HD>(ks, k, k0, seq);
        load_tile<HD>(vs, v, k0, seq);
        __syncthreads();
        // S_w = Q_w Kᵀ and dP_w = dO_w Vᵀ: [16 queries × 64 keys].
        rows_times_rows_t<HD>(s_w, qs + 16 * w * Ld<HD>::h, ks);
        rows_times_rows_t<HD>(dp_w, dos + 16 * w * Ld<HD>::h, vs);
        __syncwarp();
        for (int j = half * APR_HALF; j < (half + 1) * APR_HALF; ++j) {
            const int key = k0 + j;
            score_grad(s_w[r * Ld<HD>::s + j], dp_w[r * Ld<HD>::s + j], row_lse, row_delta,
                       key <= row && row < seq && key < seq, scale, p_w + r * Ld<HD>::p + j,
                       ds_w + r * Ld<HD>::p + j);
        }
        __syncwarp();
        // dQ_w += dS_w K (scaled at the end).
        accumulate_times<HD>(dq_acc, ds_w, ks);
    }
    __syncwarp();
    store_rows<HD>(dq, dq_acc, s_w, i0 + 16 * w, seq, scale);
}

} // namespace apr_flash

// delta[r] = Σ_d dout[r, d] · out[r, d] over `rows` rows of `hd`, in f32. Grid: ⌈rows / 256⌉.
extern "C" __global__ void __launch_bounds__(256)
    apr_flash_delta(const bf16* __restrict__ dout, const bf16* __restrict__ out,
                    float* __restrict__ delta, int rows, int hd) {
    const int r = blockIdx.x * 256 + threadIdx.x;
    if (r >= rows) return;
    float sum = 0.0f;
    for (int d = 0; d < hd; ++d)
        sum += __bfloat162float(dout[(size_t)r * hd + d]) * __bfloat162float(out[(size_t)r * hd + d]);
    delta[r] = sum;
}

// The entry points, one per head dimension.
#define APR_FLASH_KERNELS(HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(APR_THREADS)                                    \
        apr_flash_forward_##HD(const bf16* q, const bf16* k, const bf16* v, bf16* out,          \
                               float* lse, int seq, float scale) {                               \
        apr_flash::forward<HD>(q, k, v, out, lse, seq, scale);                                   \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(APR_THREADS) apr_flash_backward_kv_##HD(      \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,        \
        const float* delta, bf16* dk, bf16* dv, int seq, float scale) {                          \
        apr_flash::backward_kv<HD>(q, k, v, dout, lse, delta, dk, dv, seq, scale);               \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(APR_THREADS) apr_flash_backward_q_##HD(       \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,        \
        const float* delta, bf16* dq, int seq, float scale) {                                    \
        apr_flash::backward_q<HD>(q, k, v, dout, lse, delta, dq, seq, scale);                    \
    }

// The launcher compiles one head dimension at a time (`-DAPR_HEAD_DIM=64`): a quarter of the
// PTX for the driver to assemble at load. Without it, every one (the tests).
#ifdef APR_HEAD_DIM
#define APR_FLASH_KERNELS_OF(HD) APR_FLASH_KERNELS(HD) // expands APR_HEAD_DIM before pasting
APR_FLASH_KERNELS_OF(APR_HEAD_DIM)
#else
APR_FLASH_KERNELS(16)
APR_FLASH_KERNELS(32)
APR_FLASH_KERNELS(64)
APR_FLASH_KERNELS(128)
#endif
