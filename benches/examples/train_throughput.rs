//! Training-step throughput of one shape, for the side-by-side with PyTorch in
//! `scripts/cpu_baseline.sh`: `train_throughput PRESET BATCH SEQ STEPS` prints one JSON line per
//! learner (native, burn) with tokens/s over STEPS timed steps after two warm-up steps. A fifth
//! argument `native` skips the burn learner (for profiling the native one alone).

use std::time::Instant;

use apr_benches::{forward_backward, synthetic_batch};
use apr_model::backend::Backend;
use apr_model::learner::{new_learner, LearnerKind};
use apr_model::optim::AdamWConfig;
use apr_model::{init_weights, AprTokenizer, ModelConfig, Precision};

fn main() {
    apr_benches::keep_freed_memory();
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
    let packed = synthetic_batch(batch, seq);
    let tokens = (batch * seq) as f64;
    let weights = init_weights(&config, 0);
    let params = config.total_params();
    let device = Backend::Cpu.device(0).expect("cpu");
    let time = |f: &mut dyn FnMut()| {
        f();
        f();
        let start = Instant::now();
        for _ in 0..steps {
            f();
        }
        start.elapsed().as_secs_f64() / steps as f64
    };
    let kinds: &[LearnerKind] = if arg(4, "both") == "native" {
        &[LearnerKind::Native]
    } else {
        &[LearnerKind::Native, LearnerKind::Burn]
    };
    for &kind in kinds {
        let mut learner = new_learner(
            kind,
            &config,
            &weights,
            AdamWConfig::default(),
            &device,
            Precision::F32,
        )
        .expect("weights fit");
        let step_s = time(&mut || {
            forward_backward(learner.as_mut(), &packed).expect("valid batch");
            learner.step(1e-3, 1).expect("finite");
        });
        let name = match kind {
            LearnerKind::Native => "native",
            LearnerKind::Burn => "burn",
        };
        println!(
            "{{\"learner\":\"{name}\",\"preset\":\"{}\",\"params\":{params},\"batch\":{batch},\"seq\":{seq},\"step_s\":{step_s:.4},\"tokens_per_s\":{:.0}}}",
            arg(0, "small"),
            tokens / step_s
        );
    }
}
