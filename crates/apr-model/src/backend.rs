//! Choosing a device at run time among the backends compiled in.

use burn::tensor::Device;

/// A compute backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// burn-flex, pure Rust on the CPU.
    Cpu,
    /// wgpu (Vulkan, Metal, …; Mesa lavapipe without a GPU).
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            other => Err(format!(
                "unknown backend {other:?} (expected cpu, wgpu or cuda)"
            )),
        }
    }
}

/// Whether this build fuses the GPU backends' kernels and autotunes them per shape (feature
/// `fusion`; the CPU backend is never fused). Benchmark rows say so beside their figures.
pub const FUSION: bool = cfg!(feature = "fusion");

impl Backend {
    /// The backends this binary was built with.
    pub fn compiled() -> Vec<Backend> {
        let mut out = Vec::new();
        if cfg!(feature = "flex") {
            out.push(Backend::Cpu);
        }
        if cfg!(feature = "wgpu") {
            out.push(Backend::Wgpu);
        }
        if cfg!(feature = "cuda") {
            out.push(Backend::Cuda);
        }
        out
    }

    /// The first compiled backend (CPU when present).
    pub fn default_compiled() -> Result<Backend, String> {
        Self::compiled().first().copied().ok_or_else(|| {
            "this binary was built without any backend (enable a feature: flex, wgpu or cuda)"
                .into()
        })
    }

    /// The backend named by the `APR_BACKEND` environment variable, else the first compiled.
    /// Tests use it so that one test build can run on each compiled backend in turn (CI runs
    /// the model tests again with `APR_BACKEND=wgpu` on Mesa's lavapipe).
    pub fn from_env() -> Result<Backend, String> {
        match std::env::var("APR_BACKEND") {
            Ok(name) if !name.is_empty() => {
                let backend: Backend = name.parse()?;
                if !Self::compiled().contains(&backend) {
                    return Err(format!(
                        "APR_BACKEND={name}: not compiled into this binary (compiled: {:?})",
                        Self::compiled()
                    ));
                }
                Ok(backend)
            }
            _ => Self::default_compiled(),
        }
    }

    /// The device of this backend (`index` selects a GPU). Fails with one line if the backend
    /// was not compiled in or, for CUDA, no driver is present.
    pub fn device(self, index: usize) -> Result<Device, String> {
        let _ = index;
        match self {
            #[cfg(feature = "flex")]
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                if !cuda_driver_present() {
                    return Err("cuda backend: no NVIDIA driver found (libcuda.so.1)".into());
                }
                Ok(Device::cuda(index))
            }
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "backend {other:?} is not compiled into this binary (rebuild with --features {})",
                match other {
                    Backend::Cpu => "flex",
                    Backend::Wgpu => "wgpu",
                    Backend::Cuda => "cuda",
                }
            )),
        }
    }
}

/// Whether the CUDA driver library can be found (checked before touching the device, because
/// burn's CUDA runtime panics on a worker thread without it).
pub fn cuda_driver_present() -> bool {
    std::path::Path::new("/dev/nvidia0").exists()
        || [
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib64/libcuda.so.1",
            "/usr/local/nvidia/lib64/libcuda.so.1",
        ]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

/// Whether a device is the CPU (flex) backend's.
pub fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        *device == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Whether a device is a CUDA GPU (the engine captures its decode steps there).
pub fn is_cuda(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        // burn's device facade names no backend kind, but devices compare equal by index.
        (0..16).any(|i| *device == Device::cuda(i))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}
