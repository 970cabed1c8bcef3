//! The flash attention kernels (`flash_attention.cu`) on CUDA: compiled by NVRTC on first use for
//! the device's architecture, launched for bf16 `[b, h, s, hd]` tensors with `hd` one of
//! [`flash::HEAD_DIMS`]. Anything else (f32, another head dimension, an older GPU, no NVRTC, or
//! `APR_FLASH=off`) runs the generic attention, after one line on stderr where the kernels could
//! not be had.
//!
//! Like the cuBLASLt products, a launch waits for cubecl's work on the device, runs on the legacy
//! stream and synchronises it before cubecl may read the results (cubecl does not expose its
//! stream).

use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Shape};
use burn::tensor::FloatDType;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::{result as drv, sys as dsys};

use super::cuda::{is_cuda, pointer, preload, primary_context};
use super::flash::{self, DELTA_THREADS, HEAD_DIMS, THREADS, TILE};
use super::{AttentionForward, AttentionGrads, AttentionSaved, Unfused};

/// One head dimension's entry points (each compiled into its own module).
#[derive(Clone, Copy)]
struct HeadKernels {
    forward: dsys::CUfunction,
    backward_kv: dsys::CUfunction,
    backward_q: dsys::CUfunction,
    delta: dsys::CUfunction,
}

/// What every compilation needs, and the modules compiled so far.
struct Kernels {
    context: dsys::CUcontext,
    arch: String,
    include: PathBuf,
    /// Per head dimension: its kernels, or why it could not be built (said once on stderr).
    by_head_dim: Vec<(usize, Result<HeadKernels, String>)>,
}

// The handles are used under `KERNELS`' mutex only.
unsafe impl Send for Kernels {}

static KERNELS: OnceLock<Result<Mutex<Kernels>, String>> = OnceLock::new();
static FAILED_LAUNCH: OnceLock<()> = OnceLock::new();

/// Whether the flash kernels run bf16 attention of head dimension `head_dim`: `Ok`, or why not.
/// The first call for a head dimension compiles and loads its kernels (not yet timed on a GPU;
/// assembling all four head dimensions with ptxas took 9 s on this VM), and says
/// once on stderr when they could not be had.
pub fn flash_status(head_dim: usize) -> Result<(), String> {
    let kernels = kernels()?;
    let mut kernels = kernels
        .lock()
        .map_err(|_| "flash kernels lock poisoned".to_string())?;
    kernels.for_head_dim(head_dim).map(|_| ())
}

fn kernels() -> Result<&'static Mutex<Kernels>, String> {
    KERNELS
        .get_or_init(|| {
            let loaded = prepare();
            if let Err(why) = &loaded {
                eprintln!(
                    "warning: flash attention kernels unavailable ({why}); burn's attention runs instead"
                );
            }
            loaded.map(Mutex::new)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Compiles [`flash::SOURCE`] to PTX for `arch` (`sm_90`, …) with the CUDA headers of `include`,
/// for one head dimension (`Some`) or all of [`HEAD_DIMS`]. Needs NVRTC (found as cubecl finds
/// it, or in [`super::cuda`]'s library directories), no GPU. The error carries NVRTC's whole log.
pub fn compile_ptx(
    arch: &str,
    include: &Path,
    head_dim: Option<usize>,
) -> Result<Vec<c_char>, String> {
    use cudarc::nvrtc::result as rtc;
    preload("libnvrtc.so");
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc not found (set APR_CUDA_LIBS or LD_LIBRARY_PATH)".into());
    }
    let source = CString::new(flash::SOURCE).map_err(|e| e.to_string())?;
    let program = rtc::create_program(&source, None).map_err(|e| format!("NVRTC: {e}"))?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        format!("--include-path={}", include.display()),
        "--std=c++17".into(),
        "-DNDEBUG".into(),
    ];
    if let Some(hd) = head_dim {
        options.push(format!("-DAPR_HEAD_DIM={hd}"));
    }
    // SAFETY: `program` is live until it is destroyed below.
    let ptx = unsafe {
        match rtc::compile_program(program, &options) {
            Ok(()) => rtc::get_ptx(program).map_err(|e| format!("NVRTC: {e}")),
            Err(e) => {
                let log = rtc::get_program_log(program)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(format!("NVRTC: {e}\n{log}"))
            }
        }
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { rtc::destroy_program(program) };
    ptx
}

/// The device's architecture and CUDA's headers: what compiling needs.
fn prepare() -> Result<Kernels, String> {
    if std::env::var("APR_FLASH").is_ok_and(|v| v == "off") {
        return Err("turned off by APR_FLASH=off".into());
    }
    let context = primary_context()?;
    let attribute = |a| unsafe {
        let device = drv::device::get(0).map_err(|e| format!("CUDA device: {e:?}"))?;
        drv::device::get_attribute(device, a).map_err(|e| format!("CUDA device: {e:?}"))
    };
    use dsys::CUdevice_attribute as A;
    let major = attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    if major < 8 {
        return Err(format!(
            "they need bf16 tensor cores (sm_80 or newer); this GPU is sm_{major}{minor}"
        ));
    }
    let root = cubecl_cuda::install::cuda_path()
        .ok_or("CUDA headers not found (set CUDA_PATH, as for cubecl)")?;
    Ok(Kernels {
        context,
        arch: format!("sm_{major}{minor}"),
        include: root.join("include"),
        by_head_dim: Vec::new(),
    })
}

impl Kernels {
    /// The kernels of head dimension `hd`, compiled and loaded on first use.
    fn for_head_dim(&mut self, hd: usize) -> Result<HeadKernels, String> {
        if !HEAD_DIMS.contains(&hd) {
            return Err(format!("head dimension {hd} is not one of {HEAD_DIMS:?}"));
        }
        if let Some((_, built)) = self.by_head_dim.iter().find(|(d, _)| *d == hd) {
            return built.clone();
        }
        let built = self.build(hd);
        if let Err(why) = &built {
            eprintln!(
                "warning: flash attention kernels for head dimension {hd} unavailable ({why}); burn's attention runs instead"
            );
        }
        self.by_head_dim.push((hd, built.clone()));
        built
    }

    fn build(&self, hd: usize) -> Result<HeadKernels, String> {
        let ptx = compile_ptx(&self.arch, &self.include, Some(hd)).map_err(|log| {
            // One line: NVRTC's status and its first error.
            let mut lines = log.lines();
            let head = lines.next().unwrap_or_default().to_string();
            match lines.find(|l| l.contains("error")) {
                Some(first) => format!("{head}: {}", first.trim()),
                None => head,
            }
        })?;
        // SAFETY: the primary context is current on this thread; `ptx` is NUL-terminated PTX
        // from NVRTC; the module stays loaded for the process.
        let module = unsafe {
            drv::ctx::set_current(self.context).map_err(|e| format!("CUDA context: {e:?}"))?;
            drv::module::load_data(ptx.as_ptr().cast())
        }
        .map_err(|e| format!("loading the kernels: {e:?}"))?;
        let (forward_bytes, backward_bytes) = flash::shared_bytes(hd);
        let function = |name: &str, shared: u32| {
            let c = CString::new(name).map_err(|e| e.to_string())?;
            // SAFETY: the module is loaded and never unloaded; the function exists once found.
            unsafe {
                let f =
                    drv::module::get_function(module, c).map_err(|e| format!("{name}: {e:?}"))?;
                // More than 48 KiB of dynamic shared memory must be asked for.
                drv::function::set_function_attribute(
                    f,
                    dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(|e| format!("{name}: {shared} bytes of shared memory: {e:?}"))?;
                Ok::<_, String>(f)
            }
        };
        let [forward, backward_kv, backward_q] = flash::kernel_names(hd);
        Ok(HeadKernels {
            forward: function(&forward, forward_bytes)?,
            backward_kv: function(&backward_kv, backward_bytes)?,
            backward_q: function(&backward_q, backward_bytes)?,
            delta: function("apr_flash_delta", 0)?,
        })
    }
}

/// `[b, h, s, hd]` of a non-empty CUDA bf16 tensor the kernels take, else `None`.
fn bf16_dims(t: &CubeTensor) -> Option<[usize; 4]> {
    let dims: [usize; 4] = t.meta.shape.as_slice().try_into().ok()?;
    let takes = is_cuda(t)
        && t.dtype == DType::BF16
        && !t.meta.is_tiled()
        && HEAD_DIMS.contains(&dims[3])
        && dims[..3].iter().all(|&d| d > 0);
    takes.then_some(dims)
}

fn contiguous(t: &CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(t.clone())
}

fn empty(dims: [usize; 4], like: &CubeTensor, dtype: FloatDType) -> CubeTensor {
    <Unfused as FloatTensorOps<Unfused>>::float_empty(
        Shape::from(dims.to_vec()),
        &like.device,
        dtype,
    )
}

/// One kernel argument: a pointer to its value, as `cuLaunchKernel` takes it.
fn arg<T>(value: &T) -> *mut c_void {
    (value as *const T).cast_mut().cast()
}

/// One kernel launch: a 2-D grid of 1-D blocks.
struct Launch {
    function: dsys::CUfunction,
    grid: (u32, u32),
    block: u32,
    shared_bytes: u32,
    args: Vec<*mut c_void>,
}

/// Waits for cubecl's work on `tensors`' device, hands `launches` their device addresses, runs
/// them in order on the legacy stream and waits for it, so that cubecl may read the results; the
/// guards keep every buffer in place meanwhile. Failures are said once on stderr (`None`: the
/// caller runs the generic op).
fn run(
    kernels: &Kernels,
    tensors: &[&CubeTensor],
    launches: impl FnOnce(&[u64]) -> Vec<Launch>,
) -> Option<()> {
    let result = (|| {
        <Unfused as Backend>::sync(&tensors[0].device).map_err(|e| format!("sync: {e:?}"))?;
        let mut guards = Vec::new();
        let mut addresses = Vec::new();
        for t in tensors {
            let (address, guard) = pointer(t)?;
            // The kernels read rows 16 bytes at a time; a misaligned view would fault, and a
            // fault on the device poisons the whole context.
            if address % 16 != 0 {
                return Err(format!("a tensor at {address:#x} is not 16-byte aligned"));
            }
            addresses.push(address);
            guards.push(guard);
        }
        // SAFETY: the context is device 0's primary context; every argument points at a live
        // value of the kernel's parameter type (the closure's locals outlive the launches, which
        // copy them), and every buffer at a live allocation of the size the kernel indexes (the
        // callers check the shapes).
        unsafe {
            drv::ctx::set_current(kernels.context).map_err(|e| format!("{e:?}"))?;
            for mut l in launches(&addresses) {
                drv::launch_kernel(
                    l.function,
                    (l.grid.0, l.grid.1, 1),
                    (l.block, 1, 1),
                    l.shared_bytes,
                    std::ptr::null_mut(),
                    &mut l.args,
                )
                .map_err(|e| format!("launch: {e:?}"))?;
            }
            drv::stream::synchronize(std::ptr::null_mut())
                .map_err(|e| format!("stream sync: {e:?}"))?;
        }
        drop(guards);
        Ok::<(), String>(())
    })();
    result
        .map_err(|why| {
            FAILED_LAUNCH.get_or_init(|| {
                eprintln!(
                    "warning: a flash attention kernel failed ({why}); burn's attention runs instead"
                );
            });
        })
        .ok()
}

/// The flash forward of `softmax(q kᵀ · scale + causal mask) v`, or `None` (the generic op runs).
pub(super) fn attention_forward(
    q: &FloatTensor<Unfused>,
    k: &FloatTensor<Unfused>,
    v: &FloatTensor<Unfused>,
    scale: f64,
) -> Option<AttentionForward<Unfused>> {
    let dims = bf16_dims(q)?;
    if bf16_dims(k)? != dims || bf16_dims(v)? != dims {
        return None;
    }
    let [b, h, s, hd] = dims;
    let mut kernels = kernels().ok()?.lock().ok()?;
    let function = kernels.for_head_dim(hd).ok()?.forward;
    let [q, k, v] = [q, k, v].map(contiguous);
    let out = empty(dims, &q, FloatDType::BF16);
    let lse = empty([b, h, s, 1], &q, FloatDType::F32);
    let (seq, scale) = (s as i32, scale as f32);
    run(&kernels, &[&q, &k, &v, &out, &lse], |a| {
        vec![Launch {
            function,
            grid: (s.div_ceil(TILE) as u32, (b * h) as u32),
            block: THREADS,
            shared_bytes: flash::shared_bytes(hd).0,
            args: vec![
                arg(&a[0]),
                arg(&a[1]),
                arg(&a[2]),
                arg(&a[3]),
                arg(&a[4]),
                arg(&seq),
                arg(&scale),
            ],
        }]
    })?;
    Some(AttentionForward { out, lse })
}

/// The flash backward (dQ, dK, dV of the forward above), or `None` (the generic op runs).
pub(super) fn attention_backward(
    saved: &AttentionSaved<Unfused>,
    dout: &FloatTensor<Unfused>,
    scale: f64,
) -> Option<AttentionGrads<Unfused>> {
    let dims = bf16_dims(&saved.q)?;
    for t in [&saved.k, &saved.v, &saved.out, dout] {
        if bf16_dims(t)? != dims {
            return None;
        }
    }
    let [b, h, s, hd] = dims;
    if saved.lse.dtype != DType::F32 || saved.lse.meta.shape.as_slice() != [b, h, s, 1] {
        return None;
    }
    let mut kernels = kernels().ok()?.lock().ok()?;
    let head = kernels.for_head_dim(hd).ok()?;
    let [q, k, v, out, dout, lse] =
        [&saved.q, &saved.k, &saved.v, &saved.out, dout, &saved.lse].map(contiguous);
    let delta = empty([b, h, s, 1], &q, FloatDType::F32);
    let [dq, dk, dv] = [0; 3].map(|_| empty(dims, &q, FloatDType::BF16));
    let (seq, scale, rows, head_dim) = (s as i32, scale as f32, (b * h * s) as i32, hd as i32);
    let tensors = [&q, &k, &v, &out, &dout, &lse, &delta, &dq, &dk, &dv];
    run(&kernels, &tensors, |a| {
        let [q, k, v, out, dout, lse, delta, dq, dk, dv] =
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map(|i| &a[i]);
        let grid = (s.div_ceil(TILE) as u32, (b * h) as u32);
        let shared_bytes = flash::shared_bytes(hd).1;
        // Both backward kernels take (q, k, v, dout, lse, delta, their outputs…, seq, scale).
        let inputs = [q, k, v, dout, lse, delta].map(arg);
        vec![
            Launch {
                function: head.delta,
                grid: ((b * h * s).div_ceil(DELTA_THREADS as usize) as u32, 1),
                block: DELTA_THREADS,
                shared_bytes: 0,
                args: vec![arg(dout), arg(out), arg(delta), arg(&rows), arg(&head_dim)],
            },
            Launch {
                function: head.backward_kv,
                grid,
                block: THREADS,
                shared_bytes,
                args: [&inputs[..], &[arg(dk), arg(dv), arg(&seq), arg(&scale)]].concat(),
            },
            Launch {
                function: head.backward_q,
                grid,
                block: THREADS,
                shared_bytes,
                args: [&inputs[..], &[arg(dq), arg(&seq), arg(&scale)]].concat(),
            },
        ]
    })?;
    Some(AttentionGrads { dq, dk, dv })
}
