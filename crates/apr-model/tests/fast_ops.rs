//! Every fast op equals the plain burn formulation it replaces, in value and in gradient:
//! matrix products in each transposition, and causal attention across query blocks (odd
//! lengths, blocks of one row, blocks longer than the sequence), in f32 and in bf16. On CUDA
//! the same tests compare cuBLASLt against burn's own matmul.

use apr_model::backend::Backend;
use apr_model::fast_ops::{self, Precision};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, Distribution, Int, Tensor};

fn device() -> Device {
    Backend::from_env().unwrap().device(0).unwrap().autodiff()
}

/// Largest |a − b| relative to the largest |b| (at least 1).
fn rel_err<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// f32 tolerance on this backend: exact on the CPU, TF32 on a GPU's tensor cores.
fn tol() -> f32 {
    match Backend::from_env().unwrap() {
        Backend::Cpu => 1e-5,
        _ => 5e-3,
    }
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad()
}

fn swap_last<const D: usize>(x: Tensor<D>, yes: bool) -> Tensor<D> {
    if yes {
        x.swap_dims(D - 2, D - 1)
    } else {
        x
    }
}

#[test]
fn matmul_matches_burn_in_value_and_gradient_for_every_transposition() {
    let device = device();
    for (tl, tr) in [(false, false), (false, true), (true, false), (true, true)] {
        // op(lhs) is 2×3×5 and op(rhs) 2×5×7, stored transposed where the flag says.
        let lhs_shape = if tl { [2, 5, 3] } else { [2, 3, 5] };
        let rhs_shape = if tr { [2, 7, 5] } else { [2, 5, 7] };
        let (lhs, rhs) = (random(lhs_shape, &device), random(rhs_shape, &device));
        let w = random([2, 3, 7], &device).detach();
        let fast = fast_ops::matmul(lhs.clone(), rhs.clone(), tl, tr);
        let grads = (fast.clone() * w.clone()).sum().backward();
        let (dl, dr) = (lhs.grad(&grads).unwrap(), rhs.grad(&grads).unwrap());
        let (l2, r2) = (lhs.detach().require_grad(), rhs.detach().require_grad());
        let plain = swap_last(l2.clone(), tl).matmul(swap_last(r2.clone(), tr));
        let grads = (plain.clone() * w).sum().backward();
        let what = format!("transpose ({tl}, {tr})");
        assert!(rel_err(fast, plain) < tol(), "{what}: value");
        assert!(
            rel_err(dl, l2.grad(&grads).unwrap()) < tol(),
            "{what}: d lhs"
        );
        assert!(
            rel_err(dr, r2.grad(&grads).unwrap()) < tol(),
            "{what}: d rhs"
        );
    }
}

#[test]
fn linear_of_a_sliced_input_matches_burn() {
    // A row slice of a wider activation: the fast product must respect its strides.
    let device = device();
    let x = random([2, 6, 9], &device);
    let w = random([4, 5], &device);
    let xs = x.clone().narrow(2, 3, 4);
    let fast = fast_ops::linear(xs.clone(), w.clone(), Precision::F32);
    let plain = xs.matmul(w.clone().unsqueeze());
    assert!(rel_err(fast, plain) < tol());
}

/// `softmax(q kᵀ/√d + causal mask) v`, materialised, as the model computed it before.
fn plain_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, s, hd] = q.dims();
    let device = q.device();
    let pos = Tensor::<1, Int>::arange(0..s as i64, &device);
    let mask = pos
        .clone()
        .reshape([1, s])
        .greater(pos.reshape([s, 1]))
        .reshape([1, 1, s, s]);
    let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    let [b, h, _, _] = scores.dims();
    softmax(
        scores.mask_fill(mask.expand([b, h, s, s]), f32::NEG_INFINITY),
        3,
    )
    .matmul(v)
}

struct AttentionCase {
    out: Tensor<4>,
    dq: Tensor<4>,
    dk: Tensor<4>,
    dv: Tensor<4>,
}

fn run_attention(
    qkv: [&Tensor<4>; 3],
    dout: &Tensor<4>,
    f: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> AttentionCase {
    let [q, k, v] = qkv.map(|t| t.clone().detach().require_grad());
    let out = f(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * dout.clone()).sum().backward();
    AttentionCase {
        out,
        dq: q.grad(&grads).unwrap(),
        dk: k.grad(&grads).unwrap(),
        dv: v.grad(&grads).unwrap(),
    }
}

fn assert_close(a: AttentionCase, b: AttentionCase, tol: f32, what: &str) {
    for (name, x, y) in [
        ("output", a.out, b.out),
        ("dq", a.dq, b.dq),
        ("dk", a.dk, b.dk),
        ("dv", a.dv, b.dv),
    ] {
        let e = rel_err(x, y);
        assert!(e < tol, "{what}: {name} off by {e} (tolerance {tol})");
    }
}

#[test]
fn blocked_attention_matches_the_materialised_one_in_value_and_gradient() {
    let device = device();
    // Peaked scores (large q) so that a wrong mask or normaliser shows.
    let q = random([2, 3, 13, 8], &device) * 3.0;
    let (k, v) = (
        random([2, 3, 13, 8], &device),
        random([2, 3, 13, 8], &device),
    );
    let dout = random([2, 3, 13, 8], &device).detach();
    let reference = || run_attention([&q, &k, &v], &dout, plain_attention);
    for block in [1, 4, 5, 13, 64] {
        let fast = run_attention([&q, &k, &v], &dout, |q, k, v| {
            fast_ops::causal_attention_blocked(q, k, v, block)
        });
        assert_close(fast, reference(), tol() * 4.0, &format!("block {block}"));
    }
    // The model's entry point picks its own block and scale.
    let fast = run_attention([&q, &k, &v], &dout, |q, k, v| {
        fast_ops::causal_attention(q, k, v, Precision::F32)
    });
    assert_close(fast, reference(), tol() * 4.0, "default block");
}

#[test]
fn bf16_attention_and_products_stay_within_bf16_of_f32() {
    let device = device();
    if Backend::from_env().unwrap() == Backend::Wgpu && !device.supports_dtype(DType::BF16) {
        // Lavapipe has no bf16 products: asking for them is refused in one line.
        let why = Precision::Bf16.check(&device).unwrap_err();
        assert!(why.contains("bf16") && !why.contains('\n'));
        return;
    }
    Precision::Bf16.check(&device).unwrap();
    let q = random([1, 2, 33, 16], &device);
    let (k, v) = (
        random([1, 2, 33, 16], &device),
        random([1, 2, 33, 16], &device),
    );
    let dout = random([1, 2, 33, 16], &device).detach();
    let bf16 = run_attention([&q, &k, &v], &dout, |q, k, v| {
        fast_ops::causal_attention(q, k, v, Precision::Bf16)
    });
    let f32 = run_attention([&q, &k, &v], &dout, plain_attention);
    // bf16 keeps 8 bits of mantissa (relative 2^-8 ≈ 0.004 a rounding); a few roundings deep.
    assert_close(bf16, f32, 5e-2, "bf16 attention");
    let x = random([2, 7, 24], &device);
    let w = random([24, 9], &device);
    let fast = fast_ops::linear(x.clone(), w.clone(), Precision::Bf16);
    let grads = fast.clone().sum().backward();
    let dw = w.grad(&grads).unwrap();
    assert_eq!(dw.dtype(), DType::F32, "master-weight gradients stay f32");
    let plain = x.clone().matmul(w.clone().unsqueeze());
    let e = rel_err(fast, plain);
    // Within bf16, and not exact: the product really ran in bf16.
    assert!(e < 3e-2 && e > 1e-6, "bf16 product off by {e}");
}

#[test]
fn attention_block_fits_the_budget_and_covers_short_sequences_whole() {
    assert_eq!(fast_ops::attention_block(2, 4, 100), 100);
    let rows = fast_ops::attention_block(8, 16, 4096);
    assert!(
        rows * 8 * 16 * 4096 <= fast_ops::SCORE_BUDGET && rows.is_multiple_of(16) && rows >= 16
    );
    assert!(fast_ops::attention_block(1 << 20, 1 << 10, 1 << 10) >= 1);
}

/// The shape fusion records for a product before it runs must be the shape the product has.
#[test]
fn matmul_shape_is_the_products_shape_in_every_transposition() {
    use burn::tensor::Shape;
    let device = device();
    for (tl, tr) in [(false, false), (false, true), (true, false), (true, true)] {
        let lhs_shape = if tl { [2, 3, 5, 4] } else { [2, 3, 4, 5] };
        let rhs_shape = if tr { [2, 3, 6, 5] } else { [2, 3, 5, 6] };
        let (lhs, rhs) = (random(lhs_shape, &device), random(rhs_shape, &device));
        let expected =
            fast_ops::matmul_shape(&Shape::from(lhs_shape), &Shape::from(rhs_shape), &tl, &tr);
        assert_eq!(
            expected,
            Shape::from([2, 3, 4, 6]),
            "transpose ({tl}, {tr})"
        );
        assert_eq!(fast_ops::matmul(lhs, rhs, tl, tr).shape(), expected);
    }
}

#[test]
fn precision_names_round_trip() {
    for p in Precision::ALL {
        assert_eq!(p.name().parse::<Precision>().unwrap(), p);
    }
    assert!("fp8"
        .parse::<Precision>()
        .unwrap_err()
        .contains("f32 or bf16"));
}

/// On a CUDA device the products must really go through cuBLASLt (else these tests compared burn
/// with itself); elsewhere its absence is one line, not a panic.
#[cfg(feature = "cuda")]
#[test]
fn cublaslt_is_used_on_cuda_and_its_absence_is_one_line() {
    match (
        Backend::from_env().unwrap(),
        fast_ops::cuda::cublaslt_status(),
    ) {
        (Backend::Cuda, status) => assert!(status.is_ok(), "cuBLASLt: {status:?}"),
        (_, Err(why)) => assert!(!why.contains('\n') && !why.is_empty(), "{why}"),
        (_, Ok(())) => {}
    }
}

/// bf16 attention at the model's head dimensions and odd lengths that cross 64-row tiles, against
/// the materialised f32 formulation: on CUDA this is the flash kernels (asserted in use), elsewhere
/// burn's blocked ops in bf16.
#[test]
fn bf16_attention_at_model_shapes_follows_f32_and_runs_flash_on_cuda() {
    let device = device();
    if Precision::Bf16.check(&device).is_err() {
        // Lavapipe: covered by the refusal test above.
        assert_eq!(Backend::from_env().unwrap(), Backend::Wgpu);
        return;
    }
    for [b, h, s, hd] in [
        [1, 4, 200, 64],
        [2, 2, 77, 32],
        [1, 2, 70, 128],
        [1, 3, 1, 16],
    ] {
        let implementation = fast_ops::attention_implementation(&device, hd);
        match Backend::from_env().unwrap() {
            Backend::Cuda => assert_eq!(implementation, "flash", "hd {hd}"),
            _ => assert_eq!(implementation, "burn"),
        }
        let q = random([b, h, s, hd], &device) * 2.0;
        let (k, v) = (
            random([b, h, s, hd], &device),
            random([b, h, s, hd], &device),
        );
        let dout = random([b, h, s, hd], &device).detach();
        let bf16 = run_attention([&q, &k, &v], &dout, |q, k, v| {
            fast_ops::causal_attention(q, k, v, Precision::Bf16)
        });
        let f32 = run_attention([&q, &k, &v], &dout, plain_attention);
        assert_close(
            bf16,
            f32,
            3e-2,
            &format!("bf16 attention [{b}, {h}, {s}, {hd}]"),
        );
    }
}
