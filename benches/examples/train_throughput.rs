//! Training-step throughput of one shape, for the side-by-side with PyTorch in
//! `scripts/cpu_baseline.sh`: `train_throughput PRESET BATCH SEQ STEPS` prints one JSON line per
//! learner (native, burn) with tokens/s over STEPS timed steps after two warm-up steps. A fifth
//! argument `native` skips the burn learner (for profiling the native one alone).

use std::time::Instant;

use apr_benches::synthetic_examples;
use apr_model::backend::Backend;
use apr_model::native::{NativeModel, PackedBatch};
use apr_model::{init_weights, AprTokenizer, Model, ModelConfig};
use apr_rl::optim::{AdamW, AdamWConfig, FlatAdamW};
use apr_rl::sft::{masked_nll, pad_batch, Example};

fn main() {
    apr_model::native::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let preset = arg(0, "small").parse().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let num = |i: usize, default: &str| -> usize {
        arg(i, default).parse().unwrap_or_else(|_| {
            eprintln!("error: argument {} must be a whole number", i + 1);
            std::process::exit(2)
        })
    };
    let (batch, seq, steps) = (num(1, "8"), num(2, "1024"), num(3, "5"));
    let tok = AprTokenizer::domain();
    let config = ModelConfig {
        max_seq_len: seq,
        ..ModelConfig::preset(preset, tok.vocab_size())
    };
    let examples = synthetic_examples(batch, seq);
    let tokens = (batch * seq) as f64;
    let weights = init_weights(&config, 0);

    let mut native = NativeModel::from_weights(&config, &weights).expect("weights fit");
    let mut optim = FlatAdamW::new(AdamWConfig::default(), native.num_params());
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.tokens.as_slice()).collect();
    let packed = PackedBatch::from_sequences(&seqs);
    let time = |f: &mut dyn FnMut()| {
        f();
        f();
        let start = Instant::now();
        for _ in 0..steps {
            f();
        }
        start.elapsed().as_secs_f64() / steps as f64
    };
    let native_s = time(&mut || {
        let fwd = native.forward(&packed).expect("valid batch");
        let mut grads = vec![0.0; native.num_params()];
        let scale = -1.0 / tokens as f32;
        native.backward(fwd, &vec![scale; packed.len()], &mut grads);
        optim
            .step(&mut native.params, &grads, 1e-3)
            .expect("finite");
    });
    println!(
        "{{\"learner\":\"native\",\"preset\":\"{}\",\"params\":{},\"batch\":{batch},\"seq\":{seq},\"step_s\":{native_s:.4},\"tokens_per_s\":{:.0}}}",
        arg(0, "small"),
        native.num_params(),
        tokens / native_s
    );
    if arg(4, "both") == "native" {
        return;
    }

    let device = Backend::Cpu.device(0).expect("cpu").autodiff();
    let mut model = Model::new(config.clone(), &weights, &device).expect("weights fit");
    let mut adam = AdamW::new(AdamWConfig::default());
    let refs: Vec<&Example> = examples.iter().collect();
    let burn_s = time(&mut || {
        let (inputs, targets, mask) = pad_batch(&refs, 0, &device);
        let loss = masked_nll(&model, inputs, targets, mask);
        adam.accumulate(&model.llama, &loss.backward());
        let (llama, _) = adam
            .step(model.llama.clone(), 1e-3)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        model.llama = llama;
    });
    println!(
        "{{\"learner\":\"burn\",\"preset\":\"{}\",\"params\":{},\"batch\":{batch},\"seq\":{seq},\"step_s\":{burn_s:.4},\"tokens_per_s\":{:.0}}}",
        arg(0, "small"),
        native.num_params(),
        tokens / burn_s
    );
}
