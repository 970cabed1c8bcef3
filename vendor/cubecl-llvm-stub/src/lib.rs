//! A stand-in for `cubecl-llvm` 0.11.3 so that `cubecl-cuda` builds without network access.
//!
//! The real crate's build script downloads a prebuilt LLVM, which fails offline. `cubecl-cuda`
//! names a handful of its items even when its `cpp` feature makes CUDA C++ through NVRTC the
//! kernel compiler; this crate provides exactly those names. Choosing the LLVM compiler at run
//! time gives a compilation error; nothing here is reached on the NVRTC path.

use cubecl_core::environment::backtrace::BackTrace;
use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::ir::DeviceProperties;
use cubecl_core::prelude::{BufferIOAttr, KernelDefinition};
use cubecl_core::CompilationError;

/// Where a kernel would be lowered to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    /// Host code (unused by CUDA).
    #[default]
    Cpu,
    /// NVIDIA PTX.
    Nvptx,
}

/// The LLVM kernel compiler; in this stand-in it always fails.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    /// Lowering target.
    pub target: LlvmTarget,
}

/// Options `cubecl-cuda` fills in for the LLVM compiler.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// AMD architecture (never set by CUDA).
    pub arch: Option<()>,
    /// NVIDIA architecture.
    pub sm_arch: Option<SmArch>,
    /// PTX version to emit.
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    /// Scalars in the kernel parameter block.
    pub grid_constants: bool,
}

/// A compiled PTX module (never produced here).
#[derive(Clone, Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX.
    pub ptx: Vec<core::ffi::c_char>,
    /// IR text, for logs and cache keys.
    pub ir: String,
    /// Dynamic shared memory per launch, in bytes.
    pub shared_memory_size: usize,
    /// Buffer access modes in binding order.
    pub io: Vec<BufferIOAttr>,
}

/// What the compiler produces.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    /// PTX for the CUDA driver.
    NvptxCode(NvptxModule),
    /// Nothing (keeps `cubecl-cuda`'s catch-all arm meaningful).
    Unsupported,
}

impl PlironCompiler {
    /// Always an error: this build has no LLVM. Use the default NVRTC compiler.
    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: "this build of cubecl-cuda has no LLVM backend (apr-rs stand-in); \
                     use the NVRTC (C++) compiler"
                .into(),
            backtrace: BackTrace::capture(),
        })
    }

    /// The language tag of the (absent) output.
    pub fn lang_tag(&self) -> &'static str {
        "llvm"
    }
}

/// NVPTX helpers.
pub mod nvptx {
    /// PTX ISA versions.
    pub mod ptx_version {
        use core::fmt;

        /// A PTX ISA version as the NVPTX target feature spells it (8.7 is `87`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The PTX version the LLVM compiler would emit for a driver: none here. Only that
            /// compiler (and its kernel-cache namespace) reads it, and this build has no LLVM.
            pub fn for_driver(_driver: i32) -> Option<Self> {
                None
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }
    }
}

/// Shared helpers.
pub mod shared {
    /// Device features narrowed to what the LLVM backend lowers.
    pub mod lowered_features {
        use super::super::DeviceProperties;

        /// The GPU a device's features are narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            /// NVIDIA PTX.
            Nvptx,
        }

        /// Leaves the properties as they are: only the LLVM compiler needs them narrowed, and
        /// it is never used in this build.
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
    }
}
