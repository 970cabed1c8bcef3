//! The CUDA flash attention kernels (`src/fast_ops/flash_attention.cu`), compiled for the host
//! against a CUDA emulator (`tests/cuda_emulator`) with AddressSanitizer, run on random bf16
//! inputs, and compared with burn's attention in f32 (the generic fast op, autodiff for the
//! gradients): output, log-sum-exp and the three gradients, at odd lengths that cross the
//! kernels' 64-row tiles, for every head dimension they are built for. On a GPU the same kernels
//! are checked again by `tests/fast_ops.rs`; this test is what checks them without one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use apr_model::backend::Backend;
use apr_model::fast_ops::{self, flash};
use burn::tensor::{Device, Tensor, TensorData};
use half::bf16;

/// Builds the harness once per run (about 30 s): the kernels' source and the emulator, one
/// translation unit.
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flash_harness");
        let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .args(["-std=c++20", "-O1", "-g", "-fsanitize=address,undefined"])
            .args([
                "-fno-sanitize-recover=all",
                "-pthread",
                "-DAPR_CUDA_EMULATOR",
                "-I",
            ])
            .arg(root.join("src/fast_ops"))
            .arg(root.join("tests/cuda_emulator/flash_harness.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("a C++20 compiler (c++, or CXX) runs");
        assert!(
            out.status.success(),
            "harness build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

fn bits(t: &Tensor<3>) -> Vec<u16> {
    t.to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| bf16::from_f32(x).to_bits())
        .collect()
}

struct Results {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Runs forward, delta and both backward kernels on the emulator.
fn emulate(inputs: [&Tensor<3>; 4], hd: usize, scale: f32) -> Results {
    let [bh, seq, _] = inputs[0].dims();
    let (smem_forward, smem_backward) = flash::shared_bytes(hd);
    let mut bytes = Vec::new();
    for d in [bh, seq, hd] {
        bytes.extend((d as i32).to_le_bytes());
    }
    bytes.extend(scale.to_le_bytes());
    bytes.extend(smem_forward.to_le_bytes());
    bytes.extend(smem_backward.to_le_bytes());
    for t in inputs {
        bytes.extend(bits(t).into_iter().flat_map(u16::to_le_bytes));
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&input, bytes).unwrap();
    let run = Command::new(harness())
        .arg(&input)
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "emulated kernels failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let raw = std::fs::read(output).unwrap();
    let n = bh * seq * hd;
    let mut at = 0;
    let take_bf16 = |count: usize, at: &mut usize| -> Vec<f32> {
        let v = raw[*at..*at + 2 * count]
            .chunks(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect();
        *at += 2 * count;
        v
    };
    let out = take_bf16(n, &mut at);
    let lse = raw[at..at + 4 * bh * seq]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    at += 4 * bh * seq;
    let dq = take_bf16(n, &mut at);
    let dk = take_bf16(n, &mut at);
    let dv = take_bf16(n, &mut at);
    assert_eq!(at, raw.len(), "output size");
    Results {
        out,
        lse,
        dq,
        dk,
        dv,
    }
}

/// Largest |a − b| relative to the largest |b| (at least 1: with one key the score gradients
/// are rounding noise around zero).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Each row's log-sum-exp of its scaled causal scores, in f64 on the host.
fn host_lse(q: &[f32], k: &[f32], bh: usize, seq: usize, hd: usize, scale: f32) -> Vec<f32> {
    let mut lse = Vec::with_capacity(bh * seq);
    for b in 0..bh {
        for i in 0..seq {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let (qi, kj) = ((b * seq + i) * hd, (b * seq + j) * hd);
                    (0..hd)
                        .map(|d| q[qi + d] as f64 * k[kj + d] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            lse.push((max + sum.ln()) as f32);
        }
    }
    lse
}

/// Normal(0, amp²) values from `seed` (splitmix64 and Box–Muller), rounded to bf16.
fn random(dims: [usize; 3], amp: f32, seed: u64, device: &Device) -> Tensor<3> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut uniform = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (uniform().max(1e-300), uniform());
            let normal = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            bf16::from_f32(normal as f32 * amp).to_f32()
        })
        .collect();
    Tensor::from_data(TensorData::new(values, dims), device)
}

fn check(device: &Device, bh: usize, seq: usize, hd: usize, seed: u64) {
    let random = |amp: f32, i: u64| random([bh, seq, hd], amp, seed * 4 + i, device);
    // Peaked scores (large q) so that a wrong mask or normaliser shows.
    let (q, k, v, dout) = (
        random(2.0, 0),
        random(1.0, 1),
        random(1.0, 2),
        random(1.0, 3),
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let got = emulate([&q, &k, &v, &dout], hd, scale);

    let four = |t: &Tensor<3>| t.clone().reshape([1, bh, seq, hd]).require_grad();
    let (q4, k4, v4) = (four(&q), four(&k), four(&v));
    let out = fast_ops::causal_attention_blocked(q4.clone(), k4.clone(), v4.clone(), 64);
    let grads = (out.clone() * dout.clone().reshape([1, bh, seq, hd]))
        .sum()
        .backward();
    let want_lse = host_lse(
        &q.to_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
        &k.to_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
        bh,
        seq,
        hd,
        scale,
    );
    let what = format!("b·h {bh}, seq {seq}, hd {hd}");
    for (name, got, want, tol) in [
        // bf16 outputs and bf16 probabilities in the products: a few 2⁻⁹ roundings (measured
        // 2–4e-3 against PyTorch in f32); the log-sum-exp is f32 throughout.
        ("output", &got.out, values(out), 1e-2),
        ("lse", &got.lse, want_lse, 1e-5),
        ("dq", &got.dq, values(q4.grad(&grads).unwrap()), 1e-2),
        ("dk", &got.dk, values(k4.grad(&grads).unwrap()), 1e-2),
        ("dv", &got.dv, values(v4.grad(&grads).unwrap()), 1e-2),
    ] {
        let e = rel_err(got, &want);
        eprintln!("{what}: {name} {e:.2e}");
        assert!(e < tol, "{what}: {name} off by {e} (tolerance {tol})");
    }
}

#[test]
fn emulated_flash_kernels_match_burns_attention_in_value_and_gradient() {
    let device = Backend::Cpu.device(0).unwrap().autodiff();
    // One key (the degenerate softmax), one partial tile, two and three tiles with ragged ends,
    // and every head dimension the kernels are built for.
    for (i, (bh, seq, hd)) in [
        (2, 1, 16),
        (3, 13, 32),
        (2, 77, 64),
        (1, 130, 64),
        (1, 70, 128),
        (2, 64, 16),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(flash::HEAD_DIMS.contains(&hd));
        check(&device, bh, seq, hd, i as u64);
    }
}

/// The same source compiles with NVRTC for Ampere and Hopper, as it will on a GPU host, into PTX
/// with every entry point and no local-memory arrays (the accumulators stay in registers). Needs
/// NVRTC and CUDA's headers, not a GPU: `APR_CUDA_HOME` names a CUDA root with `include/`, and
/// NVRTC is found as the program finds it (`APR_CUDA_LIBS`, …). `.ci/run` points both at the
/// CUDA wheel beside its torch. Without `APR_CUDA_HOME` the test says so and does nothing else.
#[cfg(feature = "cuda")]
#[test]
fn flash_kernels_compile_with_nvrtc_for_ampere_and_hopper() {
    let Some(home) = std::env::var_os("APR_CUDA_HOME") else {
        eprintln!("flash nvrtc: not run: set APR_CUDA_HOME (and APR_CUDA_LIBS) to a CUDA root with NVRTC (.ci/run does)");
        return;
    };
    let include = PathBuf::from(home).join("include");
    for arch in ["sm_80", "sm_90"] {
        let ptx = apr_model::fast_ops::flash_cuda::compile_ptx(arch, &include, None)
            .unwrap_or_else(|log| panic!("{arch}: {log}"));
        let bytes: Vec<u8> = ptx
            .iter()
            .map(|&c| c as u8)
            .take_while(|&c| c != 0)
            .collect();
        let ptx = String::from_utf8(bytes).unwrap();
        assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
        for hd in flash::HEAD_DIMS {
            for name in flash::kernel_names(hd) {
                assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: {name}");
            }
        }
        assert!(ptx.contains(".entry apr_flash_delta("));
        assert!(
            ptx.contains("mma.sync") || ptx.contains("wmma.mma"),
            "{arch}: no tensor-core products"
        );
        assert!(!ptx.contains(".local"), "{arch}: arrays in local memory");
    }
    // The launcher's one-head-dimension build has exactly that head dimension's kernels.
    let ptx = apr_model::fast_ops::flash_cuda::compile_ptx("sm_90", &include, Some(64)).unwrap();
    let ptx: String = ptx.iter().map(|&c| c as u8 as char).collect();
    assert!(
        ptx.contains(".entry apr_flash_forward_64(") && ptx.contains(".entry apr_flash_delta(")
    );
    assert!(!ptx.contains("apr_flash_forward_32"));
}
