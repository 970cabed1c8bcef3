//! Training and decode throughput of one preset on a chosen backend, for `scripts/gpu_bench.sh`
//! (which runs it beside PyTorch on the same card). One measurement per process, because burn
//! fixes a device's float type before its first tensor and because an out-of-memory failure
//! should cost one row of the table, not the run. Prints one JSON line.
//!
//! ```text
//! gpu_bench train  BACKEND PRESET DTYPE MICRO_BATCH SEQ ACCUM STEPS
//! gpu_bench decode BACKEND PRESET DTYPE SLOTS PROMPT NEW_TOKENS MAX_LEN PATH
//! gpu_bench parts  BACKEND PRESET DTYPE MICRO_BATCH SEQ REPEATS
//! ```
//! `DTYPE` is `f32`, `bf16` (every tensor in that type: weights, activations, optimizer
//! state) or `mixed` (f32 weights, optimizer state, norms and loss; bf16 products and attention,
//! as PyTorch's autocast). A training step is `ACCUM` micro-batches of `MICRO_BATCH × SEQ` tokens through the
//! burn learner (autodiff, AdamW), timed after two warm-up steps; decode prefills `PROMPT`
//! tokens into every slot, then times `NEW_TOKENS` greedy steps of all slots through the
//! engine (a second pass, after one that compiles every kernel shape it meets and captures every
//! graph), its decode steps on `PATH` (`dynamic`, `static` or `captured`). A captured run whose
//! captures fell back to op-by-op replays prints its row with an `error` and exits with 3.

use std::time::Instant;

use apr_benches::{forward_backward, synthetic_batch};
use apr_core::decoder::{BatchedDecoder, Sampling, StepInput};
use apr_model::backend::Backend;
use apr_model::burn::tensor::{Device, Distribution, FloatDType, Int, Tensor};
use apr_model::fast_ops;
use apr_model::learner::{BurnLearner, Learner};
use apr_model::optim::AdamWConfig;
use apr_model::{
    init_weights, AprTokenizer, DecodePath, Engine, Model, ModelConfig, Precision, Preset,
};

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

fn number(args: &[String], i: usize) -> usize {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| fail(format!("argument {} must be a whole number", i + 1)))
}

/// The device, its float type set before any tensor exists.
fn device(backend: &str, dtype: &str) -> Device {
    let backend: Backend = backend.parse().unwrap_or_else(|e| fail(e));
    let mut device = backend.device(0).unwrap_or_else(|e| fail(e));
    let float = match dtype {
        "f32" | "mixed" => FloatDType::F32,
        "bf16" => FloatDType::BF16,
        other => fail(format!("dtype {other:?}: expected f32 or bf16")),
    };
    device
        .configure(float)
        .unwrap_or_else(|e| fail(format!("{dtype} on {backend:?}: {e:?}")));
    device
}

fn config(preset: &str, max_len: usize) -> ModelConfig {
    let preset: Preset = preset.parse().unwrap_or_else(|e| fail(e));
    let tok = AprTokenizer::domain();
    ModelConfig {
        max_seq_len: max_len,
        ..ModelConfig::preset(preset, tok.vocab_size())
    }
}

fn model(preset: &str, max_len: usize, device: &Device) -> (ModelConfig, Model) {
    let config = config(preset, max_len);
    let weights = init_weights(&config, 0);
    let model = Model::new(config.clone(), &weights, device).unwrap_or_else(|e| fail(e));
    (config, model)
}

/// The burn learner over fresh weights on `device` (its model on the autodiff wrapper).
fn learner(preset: &str, max_len: usize, device: &Device) -> (ModelConfig, BurnLearner) {
    let config = config(preset, max_len);
    let weights = init_weights(&config, 0);
    let learner = BurnLearner::new(&config, &weights, AdamWConfig::default(), device)
        .unwrap_or_else(|e| fail(e));
    (config, learner)
}

/// What the products compute in: bf16 for `mixed`, else the device's own type.
fn precision(dtype: &str) -> Precision {
    if dtype == "mixed" {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// The float type the model really computes in on its device (a one-token forward), not the one
/// asked for.
fn computed_dtype(model: &Model, device: &Device) -> String {
    let logits = model.forward(Tensor::<2, Int>::zeros([1, 1], device));
    match model.precision {
        Precision::F32 => format!("{:?}", logits.dtype()),
        p => format!("{:?} weights, {} compute", logits.dtype(), p.name()),
    }
}

fn train(args: &[String]) {
    let (mb, seq, accum, steps) = (
        number(args, 4),
        number(args, 5),
        number(args, 6),
        number(args, 7),
    );
    let base = device(&args[1], &args[3]);
    let (config, learner) = learner(&args[2], seq, &base);
    let mut learner = learner
        .with_precision(precision(&args[3]))
        .unwrap_or_else(|e| fail(e));
    let batch = synthetic_batch(mb, seq);
    let dtype = computed_dtype(learner.model(), &base.clone().autodiff());
    let implementation = implementation(&base, &config);
    let mut step = || {
        for _ in 0..accum {
            forward_backward(&mut learner, &batch).unwrap_or_else(|e| fail(e));
        }
        // The step reads the gradient norm back: the device has finished when it returns.
        learner.step(1e-4, accum).unwrap_or_else(|e| fail(e))
    };
    let start = Instant::now();
    // The first step's gradient norm, from the same weights and batch every run: rows with and
    // without cuBLASLt (or in another precision) must agree on it within rounding.
    let first_norm = step();
    let first_s = start.elapsed().as_secs_f64();
    step();
    let start = Instant::now();
    for _ in 0..steps {
        step();
    }
    let step_s = start.elapsed().as_secs_f64() / steps as f64;
    let tokens = (mb * seq * accum) as f64;
    println!(
        "{{\"what\":\"train\",\"impl\":\"apr-rs burn ({implementation})\",\"backend\":\"{}\",\"preset\":\"{}\",\"dtype\":\"{dtype}\",\"params\":{},\"micro_batch\":{mb},\"seq\":{seq},\"accum\":{accum},\"first_step_s\":{first_s:.2},\"first_grad_norm\":{first_norm:.6},\"step_s\":{step_s:.4},\"tokens_per_s\":{:.0}}}",
        args[1],
        args[2],
        config.total_params(),
        tokens / step_s
    );
}

/// The fast ops a training row ran: the products' implementation and bf16 attention's.
fn implementation(device: &Device, config: &ModelConfig) -> String {
    format!(
        "{}, attention {}{}",
        fast_ops::matmul_implementation(device),
        fast_ops::attention_implementation(device, config.d_model / config.n_heads),
        fused()
    )
}

/// `, fused` in a row of a build with kernel fusion and autotune on.
fn fused() -> &'static str {
    if apr_model::backend::FUSION {
        ", fused"
    } else {
        ""
    }
}

/// Where a training step's time goes: one micro-batch's forward alone (no autodiff), forward and
/// backward, the optimizer update alone, and one `[SEQ, d_model] × [d_model, d_ff]` matmul.
fn parts(args: &[String]) {
    let (mb, seq, repeats) = (number(args, 4), number(args, 5), number(args, 6));
    let base = device(&args[1], &args[3]);
    let (config, learner) = learner(&args[2], seq, &base);
    let mut learner = learner
        .with_precision(precision(&args[3]))
        .unwrap_or_else(|e| fail(e));
    let dtype = computed_dtype(learner.model(), &base.clone().autodiff());
    let batch = synthetic_batch(mb, seq);
    let implementation = implementation(&base, &config);
    let time = |f: &mut dyn FnMut()| {
        f();
        f();
        let start = Instant::now();
        for _ in 0..repeats {
            f();
        }
        base.sync().unwrap_or_else(|e| fail(format!("{e:?}")));
        start.elapsed().as_secs_f64() / repeats as f64
    };
    // `score` runs without autodiff and reads the log-probabilities back.
    let forward_s = time(&mut || {
        learner.score(&batch).unwrap_or_else(|e| fail(e));
    });
    let backward_s = time(&mut || {
        forward_backward(&mut learner, &batch).unwrap_or_else(|e| fail(e));
        base.sync().unwrap_or_else(|e| fail(format!("{e:?}")));
    });
    let optimizer_s = time(&mut || {
        forward_backward(&mut learner, &batch).unwrap_or_else(|e| fail(e));
        learner.step(1e-4, 1).unwrap_or_else(|e| fail(e));
    }) - backward_s;
    let (m, k, n) = (seq, config.d_model, config.d_ff);
    let a = Tensor::<2>::random([m, k], Distribution::Default, &base);
    let b = Tensor::<2>::random([k, n], Distribution::Default, &base);
    // Products are kept until the time is taken, so none can be skipped.
    let mut products = Vec::new();
    let matmul_s = time(&mut || products.push(a.clone().matmul(b.clone())));
    // The same product through the model's fast op (cuBLASLt on CUDA), in its precision.
    let p = learner.model().precision;
    let a3: Tensor<3> = a.clone().unsqueeze();
    let fast_s = time(&mut || {
        products.push(fast_ops::linear(a3.clone(), b.clone(), p).reshape([m, n]));
    });
    drop(products);
    // One layer's causal attention, forward and backward, at the step's shape and precision
    // (flash kernels on CUDA in bf16): times the layer count, what attention costs a step.
    let ad = base.clone().autodiff();
    let hd = config.d_model / config.n_heads;
    let qkv: Vec<Tensor<4>> = (0..4)
        .map(|_| {
            Tensor::random(
                [mb, config.n_heads, seq, hd],
                Distribution::Normal(0.0, 1.0),
                &ad,
            )
        })
        .collect();
    let attention_s = time(&mut || {
        let [q, k, v] = [0, 1, 2].map(|i| qkv[i].clone().require_grad());
        let out = fast_ops::causal_attention(q.clone(), k, v, p);
        let grads = (out * qkv[3].clone()).sum().backward();
        let _ = q.grad(&grads);
        ad.sync().unwrap_or_else(|e| fail(format!("{e:?}")));
    }) * config.n_layers as f64;
    println!(
        "{{\"what\":\"parts\",\"impl\":\"apr-rs burn ({implementation})\",\"backend\":\"{}\",\"preset\":\"{}\",\"dtype\":\"{}\",\"micro_batch\":{mb},\"seq\":{seq},\"forward_s\":{forward_s:.4},\"forward_backward_s\":{backward_s:.4},\"optimizer_s\":{optimizer_s:.4},\"attention_s\":{attention_s:.4},\"matmul_tflops\":{:.1},\"fast_matmul_tflops\":{:.1}}}",
        args[1],
        args[2],
        dtype,
        2.0 * (m * k * n) as f64 / matmul_s / 1e12,
        2.0 * (m * k * n) as f64 / fast_s / 1e12
    );
}

fn greedy(slot: usize, tokens: &[u32]) -> StepInput<'_> {
    StepInput {
        slot,
        tokens,
        sampling: Sampling::GREEDY,
        seed: slot as u64,
    }
}

fn decode(args: &[String]) {
    let (slots, prompt, new_tokens, max_len) = (
        number(args, 4),
        number(args, 5),
        number(args, 6),
        number(args, 7),
    );
    if prompt == 0 || prompt + new_tokens > max_len {
        fail("need 0 < PROMPT and PROMPT + NEW_TOKENS <= MAX_LEN");
    }
    let path: DecodePath = args[8].parse().unwrap_or_else(|e| fail(e));
    let device = device(&args[1], &args[3]);
    let (_, model) = model(&args[2], max_len, &device);
    let dtype = computed_dtype(&model, &device);
    let mut engine = Engine::new(model, slots, max_len, 0).with_decode_path(path);
    let prompts: Vec<Vec<u32>> = (0..slots)
        .map(|s| (0..prompt).map(|t| 4 + ((t + 5 * s) % 50) as u32).collect())
        .collect();
    let pass = |engine: &mut Engine| -> (f64, f64) {
        for s in 0..slots {
            engine.release(s);
        }
        let start = Instant::now();
        let inputs: Vec<StepInput> = (0..slots).map(|s| greedy(s, &prompts[s])).collect();
        let mut last: Vec<[u32; 1]> = engine
            .step(&inputs)
            .unwrap_or_else(|e| fail(e))
            .iter()
            .map(|s| [s.token])
            .collect();
        let prefill_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..new_tokens {
            let inputs: Vec<StepInput> = (0..slots).map(|s| greedy(s, &last[s])).collect();
            let sampled = engine.step(&inputs).unwrap_or_else(|e| fail(e));
            for (l, s) in last.iter_mut().zip(sampled) {
                *l = [s.token];
            }
        }
        (prefill_s, start.elapsed().as_secs_f64())
    };
    let (first_prefill_s, first_decode_s) = pass(&mut engine);
    let (prefill_s, decode_s) = pass(&mut engine);
    let step_ms = decode_s * 1e3 / new_tokens as f64;
    let graphs = engine.graph_report();
    let fell_back = path == DecodePath::Captured && (graphs.fallback > 0 || graphs.hardware == 0);
    let error = if fell_back {
        ",\"error\":\"capture fell back to op-by-op replays\""
    } else {
        ""
    };
    println!(
        "{{\"what\":\"decode\",\"impl\":\"apr-rs engine ({}{})\",\"backend\":\"{}\",\"preset\":\"{}\",\"dtype\":\"{}\",\"slots\":{slots},\"prompt\":{prompt},\"new_tokens\":{new_tokens},\"max_len\":{max_len},\"graphs_hardware\":{},\"graphs_fallback\":{},\"first_pass_s\":{:.2},\"prefill_s\":{prefill_s:.4},\"step_ms\":{step_ms:.3},\"tokens_per_s\":{:.0}{error}}}",
        path.name(),
        fused(),
        args[1],
        args[2],
        dtype,
        graphs.hardware,
        graphs.fallback,
        first_prefill_s + first_decode_s,
        (slots * new_tokens) as f64 / decode_s
    );
    if fell_back {
        std::process::exit(3);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match (args.first().map(String::as_str), args.len()) {
        (Some("train"), 8) => train(&args),
        (Some("decode"), 9) => decode(&args),
        (Some("parts"), 7) => parts(&args),
        _ => fail(
            "usage: gpu_bench train BACKEND PRESET DTYPE MICRO_BATCH SEQ ACCUM STEPS | \
             gpu_bench decode BACKEND PRESET DTYPE SLOTS PROMPT NEW_TOKENS MAX_LEN PATH | \
             gpu_bench parts BACKEND PRESET DTYPE MICRO_BATCH SEQ REPEATS",
        ),
    }
}
