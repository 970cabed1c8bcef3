//! The shipped APR model (`models/apr-sft`) still solves what its card says: 200 of its held-out
//! problems, greedy, through the runtime and the CPU engine. A guard on the engine, tokenizer,
//! runtime and checkpoint format together, which no unit test covers end to end.

mod common;

use apr_core::runtime::{Mode, RuntimeConfig};
use apr_model::backend::Backend;
use apr_model::{checkpoint, Model};
use apr_rl::eval::{evaluate, EvalConfig};

#[test]
fn the_shipped_apr_model_solves_what_its_card_says() {
    let dir = common::shipped_dir();
    let card = common::card();
    let val = common::held_out(&card);
    let claimed = card["regression"]["greedy_accuracy"].as_f64().unwrap();
    let n = card["regression"]["problems"].as_u64().unwrap() as usize;
    assert_eq!(n, 200);
    let ck = checkpoint::load(&dir).unwrap();
    let device = Backend::Cpu.device(0).unwrap();
    let model = Model::new(ck.meta.model.clone(), &ck.weights, &device).unwrap();
    let config = EvalConfig {
        runtime: RuntimeConfig {
            mode: Mode::Apr,
            context: card["context"].as_u64().unwrap() as usize,
            ..RuntimeConfig::default()
        },
        samples: 1,
        slots: 64,
        seed: 0,
    };
    let (_, summary) = evaluate(&model, &ck.tokenizer, &val[..n], &config, &mut |_, _| {});
    assert!(
        summary.accuracy >= claimed - 0.05,
        "the shipped model solves {:.1}% of {n} held-out problems; its card says {:.1}%",
        100.0 * summary.accuracy,
        100.0 * claimed
    );
    assert!(summary.mean_children > 0.0, "it searches in parallel");
}
