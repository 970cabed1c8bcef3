// A host emulator of the CUDA subset `src/fast_ops/flash_attention.cu` uses, so that its kernels
// can be run and checked where there is no GPU: every CUDA thread of a block is a host thread,
// `__syncthreads` and `__syncwarp` are barriers, shared memory is one buffer of exactly the size
// the launch asks for (AddressSanitizer catches an access past it), and the wmma operations
// compute whole 16 × 16 tiles. Each lane holds a full copy of its fragments (the real layout is
// spread over the warp, but the kernels only load, multiply and store fragments), and only lane 0
// writes a stored fragment, so a lane that reads another lane's store without `__syncwarp` races
// here as it would on a GPU. wmma's preconditions (256-bit aligned pointers, leading dimensions
// a multiple of 16 bytes) abort with a message.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

using std::max;
using std::min;

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
    uint16_t bits;
};
// Round to nearest, ties to even (CUDA's __float2bfloat16); NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace apr_emu {
struct Block {
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // Per warp, one slot a lane for `__shfl_xor_sync`.
    std::vector<std::vector<float>> exchange;
    std::unique_ptr<std::barrier<>> all;
    unsigned char* shared = nullptr;
};
inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* block = nullptr;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::abort();
}

// Runs `kernel` over `grid` blocks of `threads` threads (a multiple of 32) with `shared_bytes`
// of dynamic shared memory, one block after another.
inline void launch(dim3 grid, unsigned threads, size_t shared_bytes, const std::function<void()>& kernel) {
    if (threads % 32 != 0) fail("block size is not a multiple of 32");
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            Block b;
            for (unsigned w = 0; w < threads / 32; ++w) {
                b.warps.emplace_back(new std::barrier<>(32));
                b.exchange.emplace_back(32);
            }
            b.all.reset(new std::barrier<>(threads));
            // Exactly the bytes asked for, so that ASan sees an overrun; filled with garbage so
            // that reading what was never written shows.
            void* shared = nullptr;
            if (posix_memalign(&shared, 128, std::max<size_t>(shared_bytes, 1)) != 0) fail("out of memory");
            std::unique_ptr<void, decltype(&std::free)> owner(shared, &std::free);
            std::memset(shared, 0xA5, shared_bytes);
            b.shared = static_cast<unsigned char*>(shared);
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([&, t] {
                    thread_idx = dim3{t, 0, 0};
                    block_idx = dim3{bx, by, 0};
                    block = &b;
                    kernel();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
} // namespace apr_emu

#define threadIdx (apr_emu::thread_idx)
#define blockIdx (apr_emu::block_idx)
#define APR_SHARED(name) unsigned char* name = apr_emu::block->shared
inline void __syncthreads() { apr_emu::block->all->arrive_and_wait(); }
inline void __syncwarp() { apr_emu::block->warps[threadIdx.x / 32]->arrive_and_wait(); }
// Every lane of the warp must take part (the kernels pass the full mask).
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
    if (mask != 0xffffffffu) apr_emu::fail("__shfl_xor_sync with a partial mask");
    auto& slots = apr_emu::block->exchange[threadIdx.x / 32];
    const unsigned lane = threadIdx.x % 32;
    slots[lane] = value;
    __syncwarp();
    const float other = slots[lane ^ unsigned(lane_mask)];
    __syncwarp();
    return other;
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    // Logical rows × columns: a is M × K, b is K × N, the accumulator M × N.
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    float x[rows * cols];
};

inline void check(const void* ptr, unsigned ldm, size_t elem) {
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) apr_emu::fail("wmma pointer is not 256-bit aligned");
    if ((ldm * elem) % 16 != 0) apr_emu::fail("wmma leading dimension is not a multiple of 16 bytes");
}
inline float value(float f) { return f; }
inline float value(__nv_bfloat16 h) { return __bfloat162float(h); }

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* ptr, unsigned ldm) {
    check(ptr, ldm, sizeof(E));
    using F = fragment<Use, M, N, K, T, Layout>;
    constexpr bool row = std::is_same_v<Layout, row_major>;
    for (int i = 0; i < F::rows; ++i)
        for (int j = 0; j < F::cols; ++j)
            f.x[i * F::cols + j] = value(row ? ptr[i * ldm + j] : ptr[i + j * ldm]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
    check(ptr, ldm, sizeof(float));
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j)
            f.x[i * N + j] = layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm];
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
    check(ptr, ldm, sizeof(float));
    if (threadIdx.x % 32 != 0) return;
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j)
            (layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.x[i * N + j];
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
    for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
            out[i * N + j] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}
} // namespace wmma
} // namespace nvcuda
