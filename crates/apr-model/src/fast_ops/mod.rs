//! The model's hot training ops behind one backend extension: matrix products and causal
//! attention, each with a hand-written backward.
//!
//! [`FastOps`] is a burn `backend_extension`. Its default bodies (`generic`) are made of burn's
//! own primitive ops, run on every backend, and are the reference every fast implementation is
//! tested against. CUDA overrides the matrix product with cuBLASLt (`cuda`, found at run time;
//! without it the generic op runs, after a one-line warning). Attention never keeps its
//! `[b, h, s, s]` scores: the forward saves only its output and the rows' log-sum-exp, and the
//! backward recomputes the scores a block of queries at a time, so its memory is
//! bounded by [`SCORE_BUDGET`] whatever the sequence length, and every product in it is a
//! [`FastOps::fast_matmul`].
//!
//! The `Tensor` functions at the bottom ([`matmul`], [`linear`], [`causal_attention`]) are what
//! the model calls; they also apply the [`Precision`] (bf16 compute under f32 weights).
//!
//! Under burn's `fusion` feature every method is also declared to `Fusion`: it records one
//! opaque operation (its output's shape and dtype, or its structured outputs' metadata, given
//! here) and runs the unfused backend's implementation when the fused stream executes it, so
//! cuBLASLt and flash attention run under fusion as they do without it, and burn fuses the
//! element-wise work between them.

mod autodiff;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flash;
#[cfg(feature = "cuda")]
pub mod flash_cuda;
mod generic;

use burn::backend::{backend_extension, tensor::FloatTensor, Backend, ExtensionType, Shape};
use burn::tensor::{Device, FloatDType, Tensor};

#[cfg(feature = "fusion")]
use burn::backend::fusion::custom::TensorSpec;

/// The cubecl backend without fusion's lazy wrapper: where the fast ops' kernels run (under
/// `fusion`, `burn::backend::Cube` is `Fusion<Unfused>` and forwards to it).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) type Unfused = burn_cubecl::CubeBackend;

/// A causal attention forward's results: the output and each query row's log-sum-exp of its
/// scaled scores (f32 whatever the compute type: a bf16 log-sum-exp would be off by percents).
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "fusion"))]
pub struct AttentionForward<B: Backend> {
    /// `[b, h, s, hd]`.
    pub out: FloatTensor<B>,
    /// `[b, h, s, 1]`, f32.
    pub lse: FloatTensor<B>,
}

/// What a causal attention backward needs of its forward.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "fusion"))]
pub struct AttentionSaved<B: Backend> {
    /// Queries `[b, h, s, hd]`.
    pub q: FloatTensor<B>,
    /// Keys `[b, h, s, hd]`.
    pub k: FloatTensor<B>,
    /// Values `[b, h, s, hd]`.
    pub v: FloatTensor<B>,
    /// The forward's output.
    pub out: FloatTensor<B>,
    /// The forward's log-sum-exp, f32.
    pub lse: FloatTensor<B>,
}

// An autodiff state must be `Clone + Debug`; the derive would also ask it of `B`.
impl<B: Backend> Clone for AttentionSaved<B> {
    fn clone(&self) -> Self {
        AttentionSaved {
            q: self.q.clone(),
            k: self.k.clone(),
            v: self.v.clone(),
            out: self.out.clone(),
            lse: self.lse.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for AttentionSaved<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionSaved").finish_non_exhaustive()
    }
}

/// Gradients of a causal attention with respect to its three inputs.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "fusion"))]
pub struct AttentionGrads<B: Backend> {
    /// `d loss / d q`.
    pub dq: FloatTensor<B>,
    /// `d loss / d k`.
    pub dk: FloatTensor<B>,
    /// `d loss / d v`.
    pub dv: FloatTensor<B>,
}

/// The model's hot ops. Every method has a generic body; a backend overrides what it does
/// faster, and `Autodiff` overrides the differentiable ones with their hand-written backward.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Fusion: cfg(feature = "fusion"),
    Autodiff
)]
pub trait FastOps: Backend {
    /// `op(lhs) · op(rhs)` over the last two dimensions, where `op` transposes when its flag is
    /// set; both operands have the same rank and batch dimensions (no broadcasting).
    #[fusion(dtype = lhs, shape = matmul_shape(lhs, rhs, transpose_lhs, transpose_rhs))]
    fn fast_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        transpose_lhs: bool,
        transpose_rhs: bool,
    ) -> FloatTensor<Self> {
        generic::matmul::<Self>(lhs, rhs, transpose_lhs, transpose_rhs)
    }

    /// `softmax(q kᵀ · scale + causal mask) v` for `[b, h, s, hd]` inputs, a block of `block`
    /// queries at a time.
    #[fusion(dtype = q, shape = q)]
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        generic::attention_forward::<Self>(q, k, v, scale, block).out
    }

    /// [`FastOps::causal_attention`] and the log-sum-exp its backward needs.
    #[fusion(meta = attention_forward_spec)]
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> AttentionForward<Self> {
        generic::attention_forward::<Self>(q, k, v, scale, block)
    }

    /// The gradients of [`FastOps::causal_attention`] given `dout`, recomputing its scores from
    /// the saved log-sum-exp a block of queries at a time.
    #[fusion(meta = attention_grads_spec)]
    fn attention_backward(
        #[extension_type] saved: AttentionSaved<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> AttentionGrads<Self> {
        generic::attention_backward::<Self>(saved, dout, scale, block)
    }
}

/// The output shape of [`FastOps::fast_matmul`]: the batch dimensions, then the rows of
/// `op(lhs)` and the columns of `op(rhs)`.
pub fn matmul_shape(lhs: &Shape, rhs: &Shape, transpose_lhs: &bool, transpose_rhs: &bool) -> Shape {
    let rank = lhs.num_dims();
    let rows = lhs[rank - if *transpose_lhs { 1 } else { 2 }];
    let cols = rhs[rank - if *transpose_rhs { 2 } else { 1 }];
    let mut dims: Vec<usize> = (0..rank - 2).map(|i| lhs[i]).collect();
    dims.extend([rows, cols]);
    Shape::from(dims)
}

/// What [`FastOps::attention_forward`] returns, for fusion to record before it runs: the output
/// is shaped and typed as the queries, the log-sum-exp is `[b, h, s, 1]` in f32.
#[cfg(feature = "fusion")]
fn attention_forward_spec(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _scale: &f64,
    _block: &usize,
) -> AttentionForwardMetadata {
    let mut lse = q.shape.clone();
    lse[3] = 1;
    AttentionForwardMetadata {
        out: q.clone(),
        lse: TensorSpec::new(lse, burn::backend::DType::F32),
    }
}

/// What [`FastOps::attention_backward`] returns: each gradient is shaped and typed as its input.
#[cfg(feature = "fusion")]
fn attention_grads_spec(
    saved: &AttentionSavedMetadata,
    _dout: &TensorSpec,
    _scale: &f64,
    _block: &usize,
) -> AttentionGradsMetadata {
    AttentionGradsMetadata {
        dq: saved.q.clone(),
        dk: saved.k.clone(),
        dv: saved.v.clone(),
    }
}

#[cfg(feature = "flex")]
impl FastOps for burn::backend::Flex {}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
impl FastOps for Unfused {}

#[cfg(feature = "cuda")]
impl FastOps for Unfused {
    fn fast_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        transpose_lhs: bool,
        transpose_rhs: bool,
    ) -> FloatTensor<Self> {
        match cuda::matmul(&lhs, &rhs, transpose_lhs, transpose_rhs) {
            Some(out) => out,
            None => generic::matmul::<Self>(lhs, rhs, transpose_lhs, transpose_rhs),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        Self::attention_forward(q, k, v, scale, block).out
    }

    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> AttentionForward<Self> {
        match flash_cuda::attention_forward(&q, &k, &v, scale) {
            Some(forward) => forward,
            None => generic::attention_forward::<Self>(q, k, v, scale, block),
        }
    }

    fn attention_backward(
        saved: AttentionSaved<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> AttentionGrads<Self> {
        match flash_cuda::attention_backward(&saved, &dout, scale) {
            Some(grads) => grads,
            None => generic::attention_backward::<Self>(saved, dout, scale, block),
        }
    }
}

/// Which implementation [`FastOps::fast_matmul`] runs on `device`: `cuBLASLt`, or `burn` (with
/// the reason where cuBLASLt was wanted). For benchmark rows and logs.
pub fn matmul_implementation(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if crate::backend::is_cuda(&device.clone().inner()) {
        return match cuda::cublaslt_status() {
            Ok(()) => "cuBLASLt".into(),
            Err(why) => format!("burn ({why})"),
        };
    }
    let _ = device;
    "burn".into()
}

/// Which implementation bf16 causal attention of head dimension `head_dim` runs on `device`:
/// `flash` (the CUDA kernels, for head dimensions 16, 32, 64 and 128), or `burn` (with the reason
/// where flash was wanted); f32 attention always runs burn's ops. For benchmark rows and logs.
pub fn attention_implementation(device: &Device, head_dim: usize) -> String {
    #[cfg(feature = "cuda")]
    if crate::backend::is_cuda(&device.clone().inner()) {
        return match flash_cuda::flash_status(head_dim) {
            Ok(()) => "flash".into(),
            Err(why) => format!("burn ({why})"),
        };
    }
    let _ = (device, head_dim);
    "burn".into()
}

/// Scores held at once by attention (forward or backward), in elements: queries are taken in
/// blocks of as many rows as fit (1 GiB of f32 scores, whatever the sequence length; the
/// backward holds about four such tensors at once). The `paper` preset at 8 × 4,096 takes 512
/// query rows a block; the CPU presets fit whole.
pub const SCORE_BUDGET: usize = 1 << 28;

/// Query rows per block for `[b, h, s, ·]` attention within [`SCORE_BUDGET`]: all of them when
/// they fit, else a multiple of 16 (at least one row).
pub fn attention_block(batch: usize, heads: usize, seq: usize) -> usize {
    let per_row = (batch * heads * seq).max(1);
    let rows = (SCORE_BUDGET / per_row).clamp(1, seq.max(1));
    if rows >= seq || rows < 16 {
        rows
    } else {
        rows / 16 * 16
    }
}

/// The dtype matrix products and attention compute in. Weights, optimizer state, norms, the
/// residual stream, the loss and the log-softmax stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (TF32 tensor cores on a GPU, where the backend uses them).
    #[default]
    F32,
    /// Products and attention in bf16 with f32 accumulation, as PyTorch's autocast does.
    Bf16,
}

impl Precision {
    /// Every precision, for command lines.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// The name a command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether `device` can compute in this precision (lavapipe, for one, has no bf16 matmul).
    pub fn check(self, device: &Device) -> Result<(), String> {
        match self {
            Precision::Bf16 if !device.supports_dtype(FloatDType::BF16) => {
                Err("bf16 compute is not supported on this device (use f32)".into())
            }
            _ => Ok(()),
        }
    }

    fn compute<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => x.cast(FloatDType::BF16),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision {s:?} (expected f32 or bf16)"))
    }
}

fn f32_out<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

/// `op(lhs) · op(rhs)` through [`FastOps::fast_matmul`] (same rank, same batch dimensions).
pub fn matmul<const D: usize>(
    lhs: Tensor<D>,
    rhs: Tensor<D>,
    transpose_lhs: bool,
    transpose_rhs: bool,
) -> Tensor<D> {
    use burn::backend::Dispatch;
    Tensor::from_dispatch(<Dispatch as FastOps>::fast_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
        transpose_lhs,
        transpose_rhs,
    ))
}

/// `x · weight` for `x: [b, s, in]` and a burn-layout weight `[in, out]`, computed in
/// `precision` and returned in f32.
pub fn linear(x: Tensor<3>, weight: Tensor<2>, precision: Precision) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let out = weight.dims()[1];
    let x = precision.compute(x.reshape([b * s, d]));
    let y = matmul(x, precision.compute(weight), false, false);
    f32_out(y).reshape([b, s, out])
}

/// Causal self-attention of `[b, h, s, hd]` queries, keys and values (scaled by `1/√hd`),
/// computed in `precision` and returned in f32; under autodiff it keeps no scores for its
/// backward.
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    precision: Precision,
) -> Tensor<4> {
    let [b, h, s, _] = q.dims();
    let block = attention_block(b, h, s);
    let [q, k, v] = [q, k, v].map(|t| precision.compute(t));
    f32_out(causal_attention_blocked(q, k, v, block))
}

/// [`causal_attention`] in the inputs' own dtype with an explicit query block (tests use small
/// ones to cross blocks).
pub fn causal_attention_blocked(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    block: usize,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    Tensor::from_dispatch(<Dispatch as FastOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
        block.max(1),
    ))
}
