// Runs the flash attention kernels on the CUDA emulator: reads one case from argv[1], writes the
// results to argv[2] (the format `tests/flash_emulated.rs` writes and reads: little-endian i32
// b·h, seq, hd; f32 scale; u32 forward and backward shared-memory bytes; then q, k, v, dout as
// bf16 bits. Out: out as bf16 bits, lse f32, dq, dk, dv as bf16 bits).
#include "cuda_emulator.h"
// The kernels under test, found through `-I src/fast_ops`.
#include "flash_attention.cu"

#include <fstream>

template <typename T> static void read(std::ifstream& in, T* dst, size_t n) {
    in.read(reinterpret_cast<char*>(dst), n * sizeof(T));
    if (!in) apr_emu::fail("short input");
}
template <typename T> static void write(std::ofstream& out, const std::vector<T>& v) {
    out.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

#define APR_DISPATCH(HD, kernel, ...)                                                      \
    switch (HD) {                                                                          \
    case 16: kernel##_16(__VA_ARGS__); break;                                              \
    case 32: kernel##_32(__VA_ARGS__); break;                                              \
    case 64: kernel##_64(__VA_ARGS__); break;                                              \
    case 128: kernel##_128(__VA_ARGS__); break;                                            \
    default: apr_emu::fail("unsupported head dimension");                                  \
    }

int main(int argc, char** argv) {
    if (argc != 3) apr_emu::fail("usage: flash_harness IN OUT");
    std::ifstream in(argv[1], std::ios::binary);
    int32_t dims[3];
    float scale;
    uint32_t smem[2];
    read(in, dims, 3);
    read(in, &scale, 1);
    read(in, smem, 2);
    const int bh = dims[0], seq = dims[1], hd = dims[2];
    const size_t n = size_t(bh) * seq * hd, rows = size_t(bh) * seq;
    // The launcher's shared-memory sizes (`flash::shared_bytes`) are the kernels' own.
    int forward_bytes = 0, backward_bytes = 0;
    switch (hd) {
#define APR_SIZES(HD)                                                                          \
    case HD:                                                                                   \
        forward_bytes = apr_flash::ForwardSmem<HD>::bytes;                                     \
        backward_bytes = apr_flash::BackwardSmem<HD>::bytes;                                   \
        break;
        APR_SIZES(16) APR_SIZES(32) APR_SIZES(64) APR_SIZES(128)
    default: apr_emu::fail("unsupported head dimension");
    }
    if (smem[0] != uint32_t(forward_bytes) || smem[1] != uint32_t(backward_bytes))
        apr_emu::fail("shared-memory sizes differ from the launcher's");
    // Exact sizes: ASan reports any access past a tensor.
    std::vector<__nv_bfloat16> q(n), k(n), v(n), dout(n), out(n), dq(n), dk(n), dv(n);
    std::vector<float> lse(rows), delta(rows);
    for (auto* t : {&q, &k, &v, &dout}) read(in, t->data(), n);
    const unsigned tiles = (seq + APR_TILE - 1) / APR_TILE;
    const dim3 grid{tiles, unsigned(bh), 1};
    apr_emu::launch(grid, APR_THREADS, smem[0], [&] {
        APR_DISPATCH(hd, apr_flash_forward, q.data(), k.data(), v.data(), out.data(), lse.data(), seq, scale);
    });
    apr_emu::launch(dim3{unsigned((rows + 255) / 256), 1, 1}, 256, 0,
                    [&] { apr_flash_delta(dout.data(), out.data(), delta.data(), int(rows), hd); });
    apr_emu::launch(grid, APR_THREADS, smem[1], [&] {
        APR_DISPATCH(hd, apr_flash_backward_kv, q.data(), k.data(), v.data(), dout.data(), lse.data(),
                     delta.data(), dk.data(), dv.data(), seq, scale);
    });
    apr_emu::launch(grid, APR_THREADS, smem[1], [&] {
        APR_DISPATCH(hd, apr_flash_backward_q, q.data(), k.data(), v.data(), dout.data(), lse.data(),
                     delta.data(), dq.data(), seq, scale);
    });
    std::ofstream o(argv[2], std::ios::binary);
    write(o, out);
    write(o, lse);
    write(o, dq);
    write(o, dk);
    write(o, dv);
    return o ? 0 : 1;
}
