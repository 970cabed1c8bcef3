//! Causal attention forward + backward on the CPU (burn-flex, autodiff): the materialised
//! formulation the model used before (`softmax(q kᵀ/√d + mask) v`, its scores and
//! probabilities kept for the backward) against `fast_ops::causal_attention` (output and
//! log-sum-exp kept, scores recomputed a block of queries at a time), in the same run, through
//! `LAYERS` attentions in a row (each one's output the next one's queries), as a model stacks
//! them. Prints, per sequence length, the median seconds of three runs and the largest peak heap
//! growth (counted by this binary's allocator).
//!
//! ```text
//! cargo run --release -p apr-benches --example attention_cost [LAYERS HEADS HEAD_DIM LEN...]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use apr_model::burn::tensor::activation::softmax;
use apr_model::burn::tensor::{Device, Distribution, Int, Tensor};
use apr_model::fast_ops::{self, Precision};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn materialised(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, s, hd] = q.dims();
    let pos = Tensor::<1, Int>::arange(0..s as i64, &q.device());
    let mask = pos
        .clone()
        .reshape([1, s])
        .greater(pos.reshape([s, 1]))
        .reshape([1, 1, s, s])
        .expand([b, h, s, s]);
    let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3).matmul(v)
}

/// Seconds and peak heap growth (bytes) of one forward + backward.
fn run(
    f: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
    shape: [usize; 4],
    layers: usize,
    device: &Device,
) -> (f64, usize) {
    let make = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let (q, k, v) = (
        make().require_grad(),
        make().require_grad(),
        make().require_grad(),
    );
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let mut out = q.clone();
    for _ in 0..layers {
        out = f(out, k.clone(), v.clone());
    }
    let grads = out.sum().backward();
    let dq = q.grad(&grads).unwrap().sum().into_scalar::<f32>();
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(dq);
    (seconds, PEAK.load(Ordering::Relaxed) - base)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("whole numbers: HEADS HEAD_DIM LEN..."))
        .collect();
    let (layers, heads, hd, lens) = match args.as_slice() {
        [l, h, d, lens @ ..] if !lens.is_empty() => (*l, *h, *d, lens.to_vec()),
        _ => (4, 8, 64, vec![256, 1024, 2048]),
    };
    let device = Device::flex().autodiff();
    let fast = |q, k, v| fast_ops::causal_attention(q, k, v, Precision::F32);
    println!("{layers} layers of {heads} heads × {hd}, batch 1, f32, burn-flex autodiff\n");
    println!("| length | materialised s | fast s | speed | materialised MiB | fast MiB | memory |");
    println!("|---|---|---|---|---|---|---|");
    for s in lens {
        let shape = [1, heads, s, hd];
        let median = |f: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
            let mut runs: Vec<(f64, usize)> =
                (0..3).map(|_| run(f, shape, layers, &device)).collect();
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            (runs[1].0, runs.iter().map(|r| r.1).max().unwrap_or(0))
        };
        let (ms, mm) = median(&materialised);
        let (fs, fm) = median(&fast);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "| {s} | {ms:.3} | {fs:.3} | {:.2}× | {:.1} | {:.1} | {:.2}× |",
            ms / fs,
            mib(mm),
            mib(fm),
            mm as f64 / fm.max(1) as f64
        );
    }
}
