//! cuBLASLt matrix products for CUDA tensors: bf16 or f16 inputs with f32 accumulation, f32 in
//! TF32.
//!
//! The library is found at run time ([`cublaslt_status`]): `APR_CUDA_LIBS` (directories,
//! `:`-separated), the CUDA toolkit's usual places, or the NVIDIA wheels beside a PyTorch
//! install; otherwise whatever the loader finds on `LD_LIBRARY_PATH`. Without it every product
//! runs burn's own kernel, after one line on stderr, and nothing fails. `APR_CUBLASLT=off` turns
//! it off on purpose (the GPU script times a training step both ways).
//!
//! cubecl does not expose its CUDA stream, so a product waits for the device (burn's `sync`)
//! before it reads cubecl's buffers and synchronises its own stream before cubecl may read the
//! result: tens of µs a call, a few percent of a training step. For that reason only training
//! (the full forward and its backward) calls these; decoding keeps burn's kernels, which a
//! captured graph can hold.

use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Shape};
use burn::tensor::FloatDType;
use burn_cubecl::tensor::CubeTensor;

use super::Unfused;
use cudarc::cublaslt::{result as lt, sys};

/// Workspace handed to cuBLASLt (what its heuristics ask for on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

struct Library {
    handle: sys::cublasLtHandle_t,
    workspace: cudarc::driver::sys::CUdeviceptr,
    context: cudarc::driver::sys::CUcontext,
}

// The handle and the workspace are used under `LIBRARY`'s mutex only.
unsafe impl Send for Library {}

static LIBRARY: OnceLock<Result<Mutex<Library>, String>> = OnceLock::new();
static FAILED_CALL: OnceLock<()> = OnceLock::new();

/// Whether cuBLASLt products are in use: `Ok` with where the library came from, or why not.
/// The first call loads it (and says once on stderr when it could not).
pub fn cublaslt_status() -> Result<(), String> {
    library().map(|_| ())
}

fn library() -> Result<&'static Mutex<Library>, String> {
    LIBRARY
        .get_or_init(|| {
            let loaded = load();
            if let Err(why) = &loaded {
                eprintln!("warning: cuBLASLt unavailable ({why}); burn's matmul runs instead");
            }
            loaded.map(Mutex::new)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Directories that may hold `libcublasLt.so*`, most specific first.
fn search_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var("APR_CUDA_LIBS")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(Into::into)
        .collect();
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/lib",
        "/usr/lib/x86_64-linux-gnu",
    ] {
        dirs.push(d.into());
    }
    // PyTorch's NVIDIA wheels: site-packages/nvidia/<package>/lib.
    let mut roots: Vec<std::path::PathBuf> = vec!["/usr/local/lib".into(), "/usr/lib".into()];
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(v) = std::env::var(var) {
            roots.push(std::path::Path::new(&v).join("lib"));
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(std::path::Path::new(&home).join(".local/lib"));
    }
    for root in roots {
        let Ok(pythons) = std::fs::read_dir(&root) else {
            continue;
        };
        for python in pythons.flatten() {
            if !python.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            for site in ["site-packages", "dist-packages"] {
                let Ok(packages) = std::fs::read_dir(python.path().join(site).join("nvidia"))
                else {
                    continue;
                };
                dirs.extend(packages.flatten().map(|p| p.path().join("lib")));
            }
        }
    }
    dirs
}

/// Loads the first `{prefix}*` (`libcublasLt.so`, `libnvrtc.so`) of [`search_dirs`] globally, so
/// that cudarc's loader, asking for it by its soname, gets that copy.
pub(super) fn preload(prefix: &str) -> Option<String> {
    for dir in search_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        found.sort();
        for path in found.into_iter().rev() {
            let Ok(c) = std::ffi::CString::new(path.to_string_lossy().as_bytes()) else {
                continue;
            };
            // SAFETY: dlopen of a shared library by path; the handle is kept for the process.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                return Some(path.display().to_string());
            }
        }
    }
    None
}

fn load() -> Result<Library, String> {
    if std::env::var("APR_CUBLASLT").is_ok_and(|v| v == "off") {
        return Err("turned off by APR_CUBLASLT=off".into());
    }
    let from = preload("libcublasLt.so");
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublasLt not found (set APR_CUDA_LIBS or LD_LIBRARY_PATH)".into());
    }
    use cudarc::driver::result as drv;
    let context = primary_context()?;
    let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?;
    let workspace =
        unsafe { drv::malloc_sync(WORKSPACE_BYTES) }.map_err(|e| format!("workspace: {e:?}"))?;
    if let Some(path) = from {
        eprintln!("cuBLASLt: {path}");
    }
    Ok(Library {
        handle,
        workspace,
        context,
    })
}

/// Device 0's primary context, the one cubecl runs on, made current on the calling thread (the
/// first call retains it for the process).
pub(super) fn primary_context() -> Result<cudarc::driver::sys::CUcontext, String> {
    use cudarc::driver::result as drv;
    struct Context(cudarc::driver::sys::CUcontext);
    // A context handle is valid on every thread.
    unsafe impl Send for Context {}
    unsafe impl Sync for Context {}
    static CONTEXT: OnceLock<Result<Context, String>> = OnceLock::new();
    let context = CONTEXT
        .get_or_init(|| {
            // cudarc panics where it cannot load libcuda; ask first.
            // SAFETY: only probes whether the library can be opened.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no NVIDIA driver found (libcuda)".into());
            }
            drv::init().map_err(|e| format!("CUDA driver: {e:?}"))?;
            let device = drv::device::get(0).map_err(|e| format!("CUDA device: {e:?}"))?;
            unsafe { drv::primary_ctx::retain(device) }
                .map(Context)
                .map_err(|e| format!("CUDA context: {e:?}"))
        })
        .as_ref()
        .map_err(Clone::clone)?
        .0;
    unsafe { drv::ctx::set_current(context) }.map_err(|e| format!("CUDA context: {e:?}"))?;
    Ok(context)
}

/// One operand as cuBLASLt sees it (column-major).
struct Operand {
    rows: u64,
    cols: u64,
    ld: i64,
    transpose: bool,
    batch_stride: i64,
}

/// The logical matrix `op(x)` of `[.., r, c]` with element strides `(row, col)`, seen as the
/// column-major transpose cuBLASLt multiplies: `None` when its layout is not one it can read.
fn operand(shape: &Shape, strides: &[usize], transposed: bool) -> Option<(usize, usize, Operand)> {
    let rank = shape.num_dims();
    let (r, c) = (shape[rank - 2], shape[rank - 1]);
    let (sr, sc) = (strides[rank - 2] as i64, strides[rank - 1] as i64);
    // The logical matrix op(x): `m × n` with strides (si, sj).
    let (m, n, si, sj) = if transposed {
        (c, r, sc, sr)
    } else {
        (r, c, sr, sc)
    };
    // cuBLASLt multiplies op(x)ᵀ (`n × m`, column-major).
    let op = if sj == 1 && si >= n.max(1) as i64 {
        Operand {
            rows: n as u64,
            cols: m as u64,
            ld: si,
            transpose: false,
            batch_stride: 0,
        }
    } else if si == 1 && sj >= m.max(1) as i64 {
        Operand {
            rows: m as u64,
            cols: n as u64,
            ld: sj,
            transpose: true,
            batch_stride: 0,
        }
    } else {
        return None;
    };
    let batch_stride = batch_stride(&shape.as_slice()[..rank - 2], &strides[..rank - 2])?;
    Some((m, n, Operand { batch_stride, ..op }))
}

/// The one stride of batch dimensions that collapse into one (0 for a single matrix).
fn batch_stride(dims: &[usize], strides: &[usize]) -> Option<i64> {
    let live: Vec<(usize, usize)> = dims
        .iter()
        .zip(strides)
        .filter(|(&d, _)| d > 1)
        .map(|(&d, &s)| (d, s))
        .collect();
    for pair in live.windows(2) {
        if pair[0].1 != pair[1].1 * pair[1].0 {
            return None;
        }
    }
    Some(live.last().map_or(0, |&(_, s)| s as i64))
}

fn data_type(dtype: DType) -> Option<(sys::cudaDataType, sys::cublasComputeType_t)> {
    use sys::cublasComputeType_t as C;
    use sys::cudaDataType as T;
    match dtype {
        DType::F32 => Some((T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_TF32)),
        DType::BF16 => Some((T::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F)),
        DType::F16 => Some((T::CUDA_R_16F, C::CUBLAS_COMPUTE_32F)),
        _ => None,
    }
}

pub(super) fn is_cuda(t: &CubeTensor) -> bool {
    matches!(t.device, burn_cubecl::CubeDevice::Cuda(_))
}

/// `op(lhs) · op(rhs)` through cuBLASLt, or `None` (then burn's matmul runs) when the tensors
/// are not on CUDA, the library is missing, or the call failed (said once on stderr).
pub(super) fn matmul(
    lhs: &FloatTensor<Unfused>,
    rhs: &FloatTensor<Unfused>,
    transpose_lhs: bool,
    transpose_rhs: bool,
) -> Option<FloatTensor<Unfused>> {
    if !is_cuda(lhs) || lhs.dtype != rhs.dtype || lhs.meta.is_tiled() || rhs.meta.is_tiled() {
        return None;
    }
    let (dtype, compute) = data_type(lhs.dtype)?;
    let lib = library().ok()?;
    // Each operand as cuBLASLt can read it: in place, or made contiguous first.
    let readable = |t: &CubeTensor, tr: bool| {
        let layout = |t: &CubeTensor| {
            let strides: Vec<usize> = t.meta.strides.iter().copied().collect();
            operand(&t.meta.shape, &strides, tr)
        };
        match layout(t) {
            Some(op) => Some((t.clone(), op)),
            None => {
                let t = burn_cubecl::kernel::into_contiguous(t.clone());
                layout(&t).map(|op| (t, op))
            }
        }
    };
    let (lhs, (m, k, b_op)) = readable(lhs, transpose_lhs)?;
    let (rhs, (k2, n, a_op)) = readable(rhs, transpose_rhs)?;
    let rank = lhs.meta.shape.num_dims();
    let batch_dims = &lhs.meta.shape.as_slice()[..rank - 2];
    if k != k2 || batch_dims != &rhs.meta.shape.as_slice()[..rank - 2] {
        return None;
    }
    let batch: usize = batch_dims.iter().product();
    let mut out_dims = batch_dims.to_vec();
    out_dims.extend([m, n]);
    let out = <Unfused as FloatTensorOps<Unfused>>::float_zeros(
        Shape::from(out_dims),
        &lhs.device,
        FloatDType::from(lhs.dtype),
    );
    match run(
        lib,
        &lhs,
        &rhs,
        &out,
        [m, n, batch],
        a_op,
        b_op,
        dtype,
        compute,
    ) {
        Ok(()) => Some(out),
        Err(why) => {
            FAILED_CALL.get_or_init(|| {
                eprintln!("warning: a cuBLASLt product failed ({why}); burn's matmul runs instead");
            });
            None
        }
    }
}

/// The tensor's device address, and the guard that keeps its allocation in place until dropped.
pub(super) fn pointer(t: &CubeTensor) -> Result<(u64, impl Sized), String> {
    type Server = <cubecl_cuda::CudaRuntime as cubecl_runtime::runtime::Runtime>::Server;
    let managed = t
        .client
        .get_resource::<Server>(t.handle.clone())
        .map_err(|e| format!("device pointer: {e}"))?;
    let ptr = managed.resource().ptr;
    Ok((ptr, managed))
}

/// `D[n × m] = op(A)[n × k] · op(B)[k × m]`, column-major, over `batch` strided matrices, with
/// A = rhs and B = lhs (row-major `out = lhs · rhs` is column-major `outᵀ = rhsᵀ · lhsᵀ`).
#[allow(clippy::too_many_arguments)]
fn run(
    lib: &Mutex<Library>,
    lhs: &CubeTensor,
    rhs: &CubeTensor,
    out: &CubeTensor,
    [m, n, batch]: [usize; 3],
    a: Operand,
    b: Operand,
    dtype: sys::cudaDataType,
    compute: sys::cublasComputeType_t,
) -> Result<(), String> {
    let lib = lib
        .lock()
        .map_err(|_| "cuBLASLt lock poisoned".to_string())?;
    // cubecl's kernels that write the inputs (and zero the output) must be done.
    <Unfused as Backend>::sync(&lhs.device).map_err(|e| format!("sync: {e:?}"))?;
    let (a_ptr, _a) = pointer(rhs)?;
    let (b_ptr, _b) = pointer(lhs)?;
    let (d_ptr, _d) = pointer(out)?;
    let e = |e: lt::CublasError| e.to_string();
    unsafe {
        cudarc::driver::result::ctx::set_current(lib.context).map_err(|e| format!("{e:?}"))?;
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(e)?;
        let set_op = |attr, yes: bool| {
            let op: i32 = yes as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            lt::set_matmul_desc_attribute(
                desc,
                attr,
                (&op as *const i32).cast::<c_void>(),
                std::mem::size_of::<i32>(),
            )
        };
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            a.transpose,
        )
        .map_err(e)?;
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            b.transpose,
        )
        .map_err(e)?;
        let layout = |rows: u64, cols: u64, ld: i64, stride: i64| {
            let l = lt::create_matrix_layout(dtype, rows, cols, ld)?;
            if batch > 1 {
                let count = batch as i32;
                lt::set_matrix_layout_attribute(
                    l,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    (&count as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                )?;
                lt::set_matrix_layout_attribute(
                    l,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    (&stride as *const i64).cast(),
                    std::mem::size_of::<i64>(),
                )?;
            }
            Ok::<_, lt::CublasError>(l)
        };
        let a_layout = layout(a.rows, a.cols, a.ld, a.batch_stride).map_err(e)?;
        let b_layout = layout(b.rows, b.cols, b.ld, b.batch_stride).map_err(e)?;
        let d_layout = layout(n as u64, m as u64, n as i64, (m * n) as i64).map_err(e)?;
        let pref = lt::create_matmul_pref().map_err(e)?;
        let bytes = WORKSPACE_BYTES as u64;
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )
        .map_err(e)?;
        let result = lt::get_matmul_algo_heuristic(
            lib.handle, desc, a_layout, b_layout, d_layout, d_layout, pref,
        )
        .and_then(|heuristic| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            lt::matmul(
                lib.handle,
                desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a_ptr as *const c_void,
                a_layout,
                b_ptr as *const c_void,
                b_layout,
                d_ptr as *const c_void,
                d_layout,
                d_ptr as *mut c_void,
                d_layout,
                &heuristic.algo,
                lib.workspace as *mut c_void,
                WORKSPACE_BYTES,
                std::ptr::null_mut(),
            )
        });
        let _ = lt::destroy_matmul_pref(pref);
        for l in [a_layout, b_layout, d_layout] {
            let _ = lt::destroy_matrix_layout(l);
        }
        let _ = lt::destroy_matmul_desc(desc);
        result.map_err(e)?;
        // The legacy stream: cubecl's own streams may read `out` once it is done.
        cudarc::driver::result::stream::synchronize(std::ptr::null_mut())
            .map_err(|e| format!("stream sync: {e:?}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{batch_stride, operand};
    use burn::backend::Shape;

    #[test]
    fn row_major_operands_are_read_in_place_and_transposed_views_flip_the_op() {
        // [2, 3, 4] contiguous: op(x) = x is 3 × 4; cuBLASLt sees its 4 × 3 transpose, op N.
        let (m, n, op) = operand(&Shape::from([2, 3, 4]), &[12, 4, 1], false).unwrap();
        assert_eq!(
            (m, n, op.rows, op.cols, op.ld, op.transpose, op.batch_stride),
            (3, 4, 4, 3, 4, false, 12)
        );
        // The same memory transposed: op(x) is 4 × 3, read as op T of the 4 × 3 column-major.
        let (m, n, op) = operand(&Shape::from([2, 3, 4]), &[12, 4, 1], true).unwrap();
        assert_eq!(
            (m, n, op.rows, op.cols, op.ld, op.transpose),
            (4, 3, 4, 3, 4, true)
        );
        // A row slice of a longer matrix keeps its leading dimension.
        let (_, _, op) = operand(&Shape::from([2, 3, 4]), &[40, 4, 1], false).unwrap();
        assert_eq!((op.ld, op.batch_stride), (4, 40));
        // Neither row- nor column-major: not readable in place.
        assert!(operand(&Shape::from([3, 4]), &[8, 2], false).is_none());
    }

    #[test]
    fn batch_dimensions_collapse_only_when_uniformly_strided() {
        assert_eq!(batch_stride(&[2, 3], &[36, 12]), Some(12));
        assert_eq!(batch_stride(&[2, 1, 3], &[36, 99, 12]), Some(12));
        assert_eq!(batch_stride(&[2, 3], &[64, 12]), None);
        assert_eq!(batch_stride(&[1], &[5]), Some(0));
    }
}
