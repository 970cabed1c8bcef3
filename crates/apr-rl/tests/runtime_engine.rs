//! The runtime on the real engine (tiny random model): each thread's tokens equal those of
//! running it alone, and at a join only the join block is prefilled (the KV prefix is reused).

use std::collections::HashSet;

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, Sampling, SlotId, StepInput};
use apr_core::runtime::{Role, RuntimeConfig};
use apr_core::scripted::ScriptedModel;
use apr_core::SlotTable;
use apr_core::{split_spawn, Task};
use apr_countdown::problem::{streams, ProblemSpec};
use apr_countdown::record::{generate_traces, AprSolverConfig, CharCounter, SolverConfig};
use apr_countdown::search::TraceDict;
use apr_countdown::{CountdownTask, Problem};
use apr_model::backend::Backend;
use apr_model::{init_weights, AprTokenizer, Engine, Model, ModelConfig, Preset};
use apr_rl::rollout::rollout;

fn engine(slots: usize, context: usize) -> (Engine, AprTokenizer) {
    let tok = AprTokenizer::domain();
    // A wide initialisation keeps logits well apart, so greedy choices do not hinge on the last
    // bits of float rounding (batched and single passes reduce in different orders).
    let config = ModelConfig {
        max_seq_len: context,
        init_std: 0.5,
        ..ModelConfig::preset(Preset::Tiny, tok.vocab_size())
    };
    let device = Backend::Cpu.device(0).unwrap();
    let model = Model::new(config.clone(), &init_weights(&config, 5), &device).unwrap();
    (Engine::new(model, slots, context, tok.pad_id()), tok)
}

#[test]
fn thread_streams_equal_running_each_thread_alone() {
    let problems: Vec<Problem> = [
        (vec![3, 4, 8], 24),
        (vec![22, 26, 31, 53], 27),
        (vec![1, 2, 3], 6),
        (vec![5, 7, 9, 11], 40),
        (vec![10, 20, 30], 60),
        (vec![99, 98, 97, 96], 100),
        (vec![6, 6], 36),
    ]
    .into_iter()
    .map(|(nums, target)| Problem {
        start_size: nums.len(),
        nums,
        target,
        solution: vec![],
        optimal_path: String::new(),
    })
    .collect();
    let (mut batched, tok) = engine(3, 128);
    let config = RuntimeConfig {
        context: 128,
        sampling: Sampling::GREEDY,
        ..RuntimeConfig::default()
    };
    let results = rollout(&mut batched, &tok, &problems, 1, 0, &config, &mut |_| {});
    let mut lengths = HashSet::new();
    let mut compared = 0;
    for res in &results {
        for seg in &res.segments {
            lengths.insert(seg.tokens.len());
            // Replay the thread alone: every token the model sampled must be the one it picks
            // alone; tokens the runtime injected (a `<Sub Searches>` substitution) are fed as is.
            let (mut alone, _) = engine(1, 128);
            let mut pending = seg.prompt_tokens.clone();
            for (i, (&token, &sampled)) in seg.tokens.iter().zip(&seg.sampled).enumerate() {
                let s = alone.step(&[StepInput::greedy(0, &pending)]).unwrap()[0];
                if sampled {
                    assert_eq!(
                        s.token, token,
                        "problem {}, token {i}: the batched stream differs from the thread alone",
                        res.id
                    );
                    compared += 1;
                }
                pending = vec![token];
            }
        }
    }
    assert!(compared > 100, "compared {compared} tokens");
    assert!(
        lengths.len() > 1,
        "threads of different lengths: {lengths:?}"
    );
}

/// The real engine holds the KV state; a script chooses the tokens (teacher forcing), so the
/// runtime spawns and joins as the solver did.
struct Forced {
    engine: Engine,
    script: ScriptedModel<AprTokenizer>,
}

impl BatchedDecoder for Forced {
    fn table(&self) -> &SlotTable {
        self.engine.table()
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.engine.step(inputs)?;
        self.script.step(inputs)
    }
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        self.engine.truncate(slot, len)?;
        self.script.truncate(slot, len)
    }
    fn release(&mut self, slot: SlotId) {
        self.engine.release(slot);
        self.script.release(slot);
    }
}

fn scripts_for(dict: &TraceDict, prompt: &str, out: &mut Vec<(String, String)>) {
    let calls = &dict.main_calls;
    out.push((prompt.to_owned(), calls[0][prompt.len()..].to_owned()));
    for (round, children) in dict.sub_calls.iter().enumerate() {
        let split = split_spawn(&calls[round]).unwrap();
        for (node, child) in split.block.children.iter().zip(children) {
            let p = CountdownTask::apr()
                .child_prompt(&calls[round], node)
                .unwrap();
            scripts_for(child, &p, out);
        }
        let next = &calls[round + 1];
        let end = next.rfind("<End Sub Searches>\n").unwrap() + "<End Sub Searches>\n".len();
        out.push((next[..end].to_owned(), next[end..].to_owned()));
    }
}

#[test]
fn at_a_join_only_the_join_block_is_prefilled() {
    let spec = ProblemSpec {
        numbers: 3,
        max_target: 100,
    };
    let problems = spec.generate(30, 2, streams::TRAIN, &HashSet::new());
    let records = generate_traces(
        &problems,
        &SolverConfig::Apr(AprSolverConfig::default()),
        2,
        &CharCounter,
    );
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r.spawn_rounds() == 1)
        .take(3)
        .collect();
    assert_eq!(records.len(), 3);
    let mut scripts = Vec::new();
    for r in &records {
        scripts_for(
            r.trace_dict.as_ref().unwrap(),
            &CountdownTask::apr().parent_prompt(&r.problem()),
            &mut scripts,
        );
    }
    // Enough slots that no waiting parent is evicted (eviction re-prefills, by design).
    let (engine, tok) = engine(24, 1024);
    let mut forced = Forced {
        engine,
        script: ScriptedModel::with_codec(tok.clone(), scripts, 24, 1024),
    };
    let problems: Vec<Problem> = records.iter().map(|r| r.problem()).collect();
    let config = RuntimeConfig {
        context: 1024,
        ..RuntimeConfig::default()
    };
    let results = rollout(&mut forced, &tok, &problems, 1, 0, &config, &mut |_| {});
    let mut expected_prefill = 0;
    for (r, res) in records.iter().zip(&results) {
        assert_eq!(res.failure, None);
        let dict = r.trace_dict.as_ref().unwrap();
        let parents: Vec<String> = res.calls(Role::Parent);
        assert_eq!(parents, dict.main_calls);
        let prompt = CountdownTask::apr().parent_prompt(&r.problem());
        let before = split_spawn(&dict.main_calls[0]).unwrap().before;
        let join_end = dict.main_calls[1].rfind("<End Sub Searches>\n").unwrap() + 19;
        let join = &dict.main_calls[1][before.len()..join_end];
        let resumed = res
            .segments
            .iter()
            .find(|s| s.role == Role::Parent && s.round == 1)
            .unwrap();
        assert_eq!(
            resumed.reused_prefix,
            1 + tok.encode(before).unwrap().len(),
            "the pre-spawn KV prefix is kept"
        );
        let children: usize = res
            .segments_of(Role::Child)
            .map(|s| 1 + tok.encode(&s.prompt).unwrap().len())
            .sum();
        let this =
            1 + tok.encode(&prompt).unwrap().len() + children + tok.encode(join).unwrap().len();
        assert_eq!(res.metrics.prefilled_tokens, this);
        expected_prefill += this;
    }
    assert_eq!(
        forced.engine.token_counts().0 as usize,
        expected_prefill,
        "the engine prefilled prompts and join blocks only"
    );
}
