//! The flash attention kernels' source and launch geometry (`flash_attention.cu`), shared by the
//! CUDA launcher and the tests that compile the same source for the host (`tests/cuda_emulator`)
//! and with NVRTC.
//!
//! One block of four warps owns 64 query rows (forward, dQ) or 64 keys (dK, dV); each kernel
//! walks the other side's 64-row tiles up to the causal limit, so no `[s, s]` score matrix is
//! kept and nothing is summed with atomics.

/// The CUDA C++ source of the kernels.
pub const SOURCE: &str = include_str!("flash_attention.cu");

/// Head dimensions the kernels are instantiated for (each needs a multiple of 16 for wmma).
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Threads of a forward or backward block.
pub const THREADS: u32 = 128;

/// Rows of a tile: query rows of a block and keys of the tiles it walks.
pub const TILE: usize = 64;

/// Threads of a block of the `apr_flash_delta` kernel (one per row).
pub const DELTA_THREADS: u32 = 256;

// Row paddings of the shared tiles, in elements (the source's APR_PAD_H, APR_PAD_F).
const PAD_H: usize = 8;
const PAD_F: usize = 4;
const WARPS: usize = THREADS as usize / 32;

/// Dynamic shared memory of the forward kernel and of each backward kernel, in bytes, for head
/// dimension `hd` (the source's `ForwardSmem` and `BackwardSmem`).
pub fn shared_bytes(hd: usize) -> (u32, u32) {
    let tile_h = TILE * (hd + PAD_H) * 2; // a bf16 [64][hd] tile
    let scores = WARPS * 16 * (TILE + PAD_F) * 4; // every warp's f32 [16][64] scores
    let probs = WARPS * 16 * (TILE + PAD_H) * 2; // every warp's bf16 [16][64] probabilities
    let out = WARPS * 16 * (hd + PAD_F) * 4; // every warp's f32 [16][hd] output rows
    let forward = 3 * tile_h + scores + probs + out;
    let backward = 4 * tile_h + 2 * scores + 2 * probs + 2 * TILE * 4;
    (forward as u32, backward as u32)
}

/// The kernel names for head dimension `hd`: forward, dK/dV backward, dQ backward.
pub fn kernel_names(hd: usize) -> [String; 3] {
    [
        format!("apr_flash_forward_{hd}"),
        format!("apr_flash_backward_kv_{hd}"),
        format!("apr_flash_backward_q_{hd}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_head_dimension_has_its_kernels_in_the_source_and_fits_an_sm() {
        for hd in HEAD_DIMS {
            for name in kernel_names(hd) {
                let (prefix, _) = name.rsplit_once('_').unwrap();
                assert!(SOURCE.contains(prefix), "{name}");
            }
            assert!(SOURCE.contains(&format!("APR_FLASH_KERNELS({hd})")));
            let (f, b) = shared_bytes(hd);
            // Hopper and Ampere allow 227 / 163 KiB of shared memory a block.
            assert!(f.max(b) <= 163 * 1024, "hd {hd}: {f} / {b} bytes");
        }
        assert!(SOURCE.contains("apr_flash_delta"));
    }
}
