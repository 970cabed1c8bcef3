//! The APR runtime with a scripted model replaying solver traces: round trips reproduce the
//! reference's texts exactly, slots stay within capacity, budgets stop what they should, and
//! malformed output fails cleanly.

mod common;

use std::time::Duration;

use apr_core::runtime::{run, Finish, Job, Mode, ProblemResult, Role, RuntimeConfig};
use apr_core::scripted::{ByteCodec, ScriptedModel};
use apr_core::{split_spawn, Task};
use apr_countdown::pyrand::PyRandom;
use apr_countdown::record::TraceRecord;
use apr_countdown::search::TraceDict;
use apr_countdown::{CountdownTask, Problem};
use common::apr_records;

/// Scripts that make the model write exactly the solver's calls.
fn scripts_for(dict: &TraceDict, prompt: &str, out: &mut Vec<(String, String)>) {
    let calls = &dict.main_calls;
    out.push((prompt.to_owned(), calls[0][prompt.len()..].to_owned()));
    for (round, children) in dict.sub_calls.iter().enumerate() {
        let task = CountdownTask::apr();
        let split = split_spawn(&calls[round]).unwrap();
        for (node, child) in split.block.children.iter().zip(children) {
            let child_prompt = task.child_prompt(&calls[round], node).unwrap();
            scripts_for(child, &child_prompt, out);
        }
        // The post-join call continues after its join block.
        let next = &calls[round + 1];
        // The call holds every earlier join block too: its own is the last one.
        let join_end = next.rfind("<End Sub Searches>\n").unwrap() + "<End Sub Searches>\n".len();
        out.push((next[..join_end].to_owned(), next[join_end..].to_owned()));
    }
}

fn all_scripts(records: &[TraceRecord]) -> Vec<(String, String)> {
    let task = CountdownTask::apr();
    let mut scripts = Vec::new();
    for r in records {
        let prompt = task.parent_prompt(&r.problem());
        scripts_for(r.trace_dict.as_ref().unwrap(), &prompt, &mut scripts);
    }
    scripts
}

fn jobs(records: &[TraceRecord]) -> Vec<Job<Problem>> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| Job {
            id: i,
            problem: r.problem(),
            seed: i as u64,
        })
        .collect()
}

fn run_scripted(
    records: &[TraceRecord],
    slots: usize,
    config: &RuntimeConfig,
) -> (Vec<ProblemResult>, ScriptedModel) {
    let mut model = ScriptedModel::new(all_scripts(records), slots, 100_000);
    let results = run(
        &CountdownTask::apr(),
        &mut model,
        &ByteCodec,
        jobs(records),
        config,
        &mut |_| {},
    );
    (results, model)
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        context: 100_000,
        max_children: 64,
        max_spawn_rounds: 64,
        ..RuntimeConfig::default()
    }
}

#[test]
fn spawn_join_round_trips_reproduce_the_reference_texts() {
    let recs = apr_records(60, 21);
    assert!(
        recs.iter().any(|r| r.spawn_rounds() >= 2),
        "cover repeated spawn rounds"
    );
    for slots in [1, 3, 64] {
        let (results, model) = run_scripted(&recs, slots, &config());
        assert!(
            model.max_rows <= slots,
            "slots used {} > {slots}",
            model.max_rows
        );
        for (r, res) in recs.iter().zip(&results) {
            assert_eq!(res.failure, None, "slots {slots}, problem {}", res.id);
            let dict = r.trace_dict.as_ref().unwrap();
            let parents: Vec<String> = res.calls(Role::Parent);
            assert_eq!(
                parents, dict.main_calls,
                "slots {slots}, problem {}: parent calls",
                res.id
            );
            // Children come in tree order (round by round, by index), whatever the batching.
            let children: Vec<String> = res.calls(Role::Child);
            let expected: Vec<String> = dict
                .sub_calls
                .iter()
                .flatten()
                .map(|c| c.main_calls[0].clone())
                .collect();
            assert_eq!(children, expected);
            assert_eq!(res.correct(), r.solved(), "problem {}", res.id);
            assert_eq!(res.metrics.children, r.children());
            assert_eq!(res.metrics.spawn_rounds, r.spawn_rounds());
        }
    }
}

#[test]
fn the_join_reuses_the_parent_prefix() {
    let recs: Vec<TraceRecord> = apr_records(40, 5)
        .into_iter()
        .filter(|r| r.spawn_rounds() == 1)
        .take(10)
        .collect();
    let (results, model) = run_scripted(&recs, 64, &config());
    let mut expected_prefill = 0;
    for (r, res) in recs.iter().zip(&results) {
        let dict = r.trace_dict.as_ref().unwrap();
        let prompt = CountdownTask::apr().parent_prompt(&r.problem());
        let split = split_spawn(&dict.main_calls[0]).unwrap();
        let join_block = &dict.main_calls[1]
            [split.before.len()..dict.main_calls[1].find("<End Sub Searches>\n").unwrap() + 19];
        let child_prompts: usize = res
            .segments_of(Role::Child)
            .map(|s| s.prompt.len() + 1)
            .sum();
        let this = 1 + prompt.len() + child_prompts + join_block.len();
        assert_eq!(
            res.metrics.prefilled_tokens, this,
            "only prompts and the join block are prefilled"
        );
        let resumed = res
            .segments
            .iter()
            .find(|s| s.role == Role::Parent && s.round == 1)
            .unwrap();
        assert_eq!(resumed.reused_prefix, 1 + split.before.len());
        expected_prefill += this;
    }
    assert_eq!(model.prefilled(), expected_prefill);
}

#[test]
fn budgets_stop_what_they_should() {
    let recs: Vec<TraceRecord> = apr_records(80, 9)
        .into_iter()
        .filter(|r| r.spawn_rounds() >= 1 && r.children() >= 3)
        .take(8)
        .collect();
    assert!(!recs.is_empty());
    let check = |cfg: RuntimeConfig, needle: &str| {
        let (results, _) = run_scripted(&recs, 8, &cfg);
        for res in &results {
            let f = res
                .failure
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                f.contains(needle),
                "expected {needle:?}, got {:?}",
                res.failure
            );
            assert!(!res.correct());
        }
    };
    check(
        RuntimeConfig {
            max_children: 2,
            ..config()
        },
        "children exceed the budget of 2",
    );
    check(
        RuntimeConfig {
            max_spawn_rounds: 0,
            ..config()
        },
        "spawn round budget (0) exceeded",
    );
    check(
        RuntimeConfig {
            max_total_tokens: 100,
            ..config()
        },
        "total token budget exhausted",
    );
    check(
        RuntimeConfig {
            timeout: Some(Duration::ZERO),
            ..config()
        },
        "wall-clock timeout",
    );
    check(
        RuntimeConfig {
            context: 100,
            ..config()
        },
        "root thread reached the context limit",
    );
    check(
        RuntimeConfig {
            context: 50,
            ..config()
        },
        "prompt exceeds the context",
    );
    // A child that hits the per-thread context ends with `context_limit`; the tree still joins.
    let longest_child = recs
        .iter()
        .flat_map(|r| {
            r.trace_dict
                .as_ref()
                .unwrap()
                .sub_calls
                .iter()
                .flatten()
                .map(|c| c.main_calls[0].len())
        })
        .max()
        .unwrap();
    let longest_parent = recs
        .iter()
        .flat_map(|r| {
            r.trace_dict
                .as_ref()
                .unwrap()
                .main_calls
                .iter()
                .map(String::len)
        })
        .max()
        .unwrap();
    if longest_parent + 2 < longest_child {
        let (results, _) = run_scripted(
            &recs,
            8,
            &RuntimeConfig {
                context: longest_parent + 2,
                ..config()
            },
        );
        assert!(results
            .iter()
            .flat_map(|r| &r.segments)
            .any(|s| s.finish == Finish::ContextLimit && s.role == Role::Child));
    }
    // Serial mode never spawns: the parent's spawn block is just text.
    let (results, _) = run_scripted(
        &recs,
        8,
        &RuntimeConfig {
            mode: Mode::Serial,
            ..config()
        },
    );
    for res in &results {
        assert_eq!(res.metrics.children, 0);
        assert_eq!(res.failure, None);
        assert!(res.segments[0]
            .output
            .ends_with("<End Calling Sub Searches>\n"));
    }
}

#[test]
fn a_thousand_malformed_outputs_fail_cleanly() {
    let fragments = [
        "<Calling Sub Searches>\n",
        "<Start Sub Search 0 at level 1> Moving to Node #0,0\n",
        "<Start Sub Search 1 at level 1> Moving to Node #0,9\n",
        "<Start Sub Search 0 at level 1> Moving to Node #\n",
        "<End Calling Sub Searches>\n",
        "<Sub Searches>\n",
        "<End Sub Searches>\n",
        "Generated Node #0,0: 24:[1, 2] Operation: 3+4=7\n",
        "Generated Node #0,1: 24:[x] Operation: 1+1=2\n",
        "Moving to Node #0,0\n",
        "Current State: 24:[1, 2], Operations: ['3+4=7']\n",
        "24,24 equal: Goal Reached\n",
        "Exploring Operation: 1+2=3, Resulting Numbers: [3]\n",
        "garbage ~!@ ",
        "\n",
        "#",
        "<",
        "Goal Reached",
        "No solution found.\n",
    ];
    let problem = Problem::solved(vec![3, 4, 8, 3], 24).unwrap();
    let prompt = CountdownTask::apr().parent_prompt(&problem);
    let mut rng = PyRandom::new(77);
    let mut scripts = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..1000 {
        // Each job gets its own prompt (a distinct conditioning-like prefix) and random output.
        let key = format!("{prompt}{i}:");
        let n = 1 + rng.below(12) as usize;
        let text: String = (0..n)
            .map(|_| fragments[rng.below(fragments.len() as u32) as usize])
            .collect();
        scripts.push((key, text));
        jobs.push(i);
    }
    // Children prompts: whatever they are, reply with random fragments too.
    scripts.push(("Moving to Node #0,0\n".into(), "Exploring Operation: 1+2=3, Resulting Numbers: [3]\n3,24 unequal: No Solution\nNo solution found.\n".into()));
    struct Suffixed(CountdownTask);
    impl Task for Suffixed {
        type Problem = (Problem, usize);
        fn parent_prompt(&self, p: &(Problem, usize)) -> String {
            format!("{}{}:", self.0.parent_prompt(&p.0), p.1)
        }
        fn child_prompt(
            &self,
            t: &str,
            n: &apr_core::NodeId,
        ) -> Result<String, apr_core::TaskError> {
            self.0.child_prompt(t, n)
        }
        fn join_message(&self, t: &str) -> Option<String> {
            self.0.join_message(t)
        }
        fn final_answer(&self, t: &str) -> Option<String> {
            self.0.final_answer(t)
        }
        fn reward(&self, p: &(Problem, usize), a: Option<&str>) -> f32 {
            self.0.reward(&p.0, a)
        }
    }
    let mut model = ScriptedModel::new(scripts, 16, 512);
    let jobs: Vec<Job<(Problem, usize)>> = jobs
        .into_iter()
        .map(|i| Job {
            id: i,
            problem: (problem.clone(), i),
            seed: i as u64,
        })
        .collect();
    let cfg = RuntimeConfig {
        context: 512,
        max_spawn_rounds: 3,
        max_children: 4,
        ..RuntimeConfig::default()
    };
    let results = run(
        &Suffixed(CountdownTask::apr()),
        &mut model,
        &ByteCodec,
        jobs,
        &cfg,
        &mut |_| {},
    );
    assert_eq!(results.len(), 1000);
    assert!(model.max_rows <= 16);
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    assert!(failed > 0, "malformed spawns are reported");
    for r in &results {
        assert!(!r.correct(), "garbage never verifies");
        if let Some(f) = &r.failure {
            assert!(!f.to_string().is_empty());
        } else {
            // A problem that did not fail ended with its root's EOS.
            assert!(
                r.segments
                    .iter()
                    .any(|s| s.role == Role::Parent && s.finish == Finish::Eos),
                "{:?}",
                r.id
            );
        }
    }
}
