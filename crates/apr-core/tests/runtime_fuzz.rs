//! The runtime against a chaotic model that writes the protocol's markers anywhere: it never
//! fails on its own substitution, every segment it records is what the reference's decode loop
//! would write, and the records do not depend on how many slots the batch has.

mod chaos;

use apr_core::decoder::{
    BatchedDecoder, DecoderError, Horizon, Sampled, SlotId, StepInput, TextCodec,
};
use apr_core::runtime::{Finish, Job, Mode, ProblemResult, Role, RuntimeConfig};
use apr_core::scripted::{ByteCodec, ScriptedModel};
use apr_core::SlotTable;
use chaos::{check, run_chaos, Tally};

/// Each result as a JSON line, its wall-clock latency zeroed: what two runs must agree on.
fn record_lines(results: Vec<ProblemResult>) -> Vec<String> {
    results
        .into_iter()
        .map(|mut r| {
            r.metrics.latency_s = 0.0;
            serde_json::to_string(&r).unwrap()
        })
        .collect()
}

#[test]
fn chaotic_output_never_breaks_the_runtime() {
    let mut tally = Tally::default();
    for mode in [Mode::Apr, Mode::Serial] {
        let (results, model) = run_chaos(mode, 0, 1_500, 16, false);
        for r in &results {
            if let Err(e) = check(&model, r, &mut tally) {
                panic!("{mode:?}: {e}");
            }
        }
    }
    println!("chaos fuzz: {tally:?}");
    // The fuzz must reach what it is for: substitutions, spawns that join, and exact checks.
    assert!(tally.substitutions > 500, "{tally:?}");
    assert!(tally.matched_reference > 1_000, "{tally:?}");
    assert!(tally.failures < tally.problems, "{tally:?}");
}

#[test]
fn several_substitutions_in_one_call_match_the_reference_loop() {
    // The model writes `<Sub Searches>` twice in its first call; each time the runtime cuts it
    // and writes `<Calling Sub Searches>` instead, and the model goes on from there.
    let prompt = "Problem 1\n";
    let first = format!("{prompt}A <Calling Sub Searches>");
    let second = format!("{first}B\n<Calling Sub Searches>");
    // Keys are the contexts after each substitution: the script continues only from those.
    let scripts = vec![
        (prompt.to_owned(), "A <Sub Searches>\nlost".to_owned()),
        (first.clone(), "B\n<Sub Searches>".to_owned()),
        (second.clone(), " C Goal Reached".to_owned()),
    ];
    for (slots, mode) in [(1, Mode::Serial), (4, Mode::Apr)] {
        let mut model = ScriptedModel::new(scripts.clone(), slots, 1_000);
        let config = RuntimeConfig {
            mode,
            context: 1_000,
            ..RuntimeConfig::default()
        };
        let jobs = vec![Job {
            id: 0,
            problem: 1u64,
            seed: 0,
        }];
        let results = chaos::run_toy(&mut model, jobs, &config);
        let r = &results[0];
        assert_eq!(r.failure, None);
        assert_eq!(r.segments.len(), 1);
        let seg = &r.segments[0];
        assert_eq!(seg.role, Role::Parent);
        assert_eq!(seg.finish, Finish::Eos);
        assert_eq!(
            seg.output,
            "A <Calling Sub Searches>B\n<Calling Sub Searches> C Goal Reached"
        );
        // What the runtime wrote is marked as injected, what the model wrote as sampled.
        let injected: String = seg
            .tokens
            .iter()
            .zip(&seg.sampled)
            .filter(|(_, s)| !**s)
            .map(|(&t, _)| char::from((t - 3) as u8))
            .collect();
        assert_eq!(injected, "<Calling Sub Searches><Calling Sub Searches>");
        assert_eq!(
            r.answer.as_deref(),
            Some("<Calling Sub Searches> C Goal Reached")
        );
    }
}

#[test]
fn records_do_not_depend_on_the_number_of_slots() {
    for mode in [Mode::Apr, Mode::Serial] {
        let runs: Vec<Vec<String>> = [1, 7, 64]
            .into_iter()
            .map(|slots| {
                let (results, _) = run_chaos(mode, 77, 300, slots, true);
                record_lines(results)
            })
            .collect();
        for (slots, run) in [7, 64].iter().zip(&runs[1..]) {
            for (id, (a, b)) in runs[0].iter().zip(run).enumerate() {
                assert_eq!(a, b, "{mode:?}, problem {id}: 1 slot vs {slots}");
            }
        }
    }
}

#[test]
fn children_are_recorded_in_tree_order() {
    let (results, _) = run_chaos(Mode::Apr, 5, 800, 9, true);
    let mut checked = 0;
    for r in &results {
        // Depth-first: a parent call, then its round's children by index, then the next call.
        let mut expected_call = 0;
        let mut last_child: Option<(usize, usize)> = None;
        for s in &r.segments {
            match s.role {
                Role::Parent => {
                    assert_eq!(s.round, expected_call, "problem {}", r.id);
                    expected_call += 1;
                }
                Role::Child => {
                    assert_eq!(s.round + 1, expected_call, "problem {}", r.id);
                    if let Some((round, index)) = last_child {
                        assert!((round, index) < (s.round, s.index), "problem {}", r.id);
                    }
                    last_child = Some((s.round, s.index));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} children");
}

/// A decoder that answers each input with a chunk of tokens, as a remote completions server
/// does: it steps the model it wraps up to a pseudo-random length within the runtime's horizon,
/// sometimes past EOS (the runtime must discard what it cannot use).
struct Chunked {
    inner: chaos::ChaosModel,
    draws: u64,
}

impl BatchedDecoder for Chunked {
    fn table(&self) -> &SlotTable {
        self.inner.table()
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.inner.step(inputs)
    }
    fn step_many(
        &mut self,
        inputs: &[StepInput<'_>],
        horizons: &[Horizon],
    ) -> Vec<Result<Vec<Sampled>, DecoderError>> {
        let eos = ByteCodec.eos();
        inputs
            .iter()
            .zip(horizons)
            .map(|(input, h)| {
                self.draws = self
                    .draws
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + (self.draws >> 33) as usize % h.max_tokens.min(48);
                let past_eos = (self.draws >> 20) & 1 == 0;
                let mut chunk = self.inner.step(std::slice::from_ref(input))?;
                while chunk.len() < len && (past_eos || chunk.last().unwrap().token != eos) {
                    let last = [chunk.last().unwrap().token];
                    let next = StepInput {
                        tokens: &last,
                        ..input.clone()
                    };
                    chunk.extend(self.inner.step(std::slice::from_ref(&next))?);
                }
                Ok(chunk)
            })
            .collect()
    }
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        self.inner.truncate(slot, len)
    }
    fn release(&mut self, slot: SlotId) {
        self.inner.release(slot)
    }
}

#[test]
fn records_do_not_depend_on_how_many_tokens_a_step_returns() {
    for mode in [Mode::Apr, Mode::Serial] {
        let records = |chunked: bool| -> Vec<String> {
            let config = chaos::fuzz_config(mode);
            let mut model = chaos::ChaosModel::new(7, config.context);
            model.seeded = true;
            let jobs = (0..400)
                .map(|i| Job {
                    id: i,
                    problem: 900 + i as u64,
                    seed: 900 + i as u64,
                })
                .collect();
            let results = if chunked {
                let mut decoder = Chunked {
                    inner: model,
                    draws: 3,
                };
                chaos::run_toy(&mut decoder, jobs, &config)
            } else {
                chaos::run_toy(&mut model, jobs, &config)
            };
            record_lines(results)
        };
        let (one, many) = (records(false), records(true));
        let substituted = one
            .iter()
            .filter(|r| r.contains("Calling Sub Searches"))
            .count();
        assert!(
            substituted > 20,
            "{mode:?}: only {substituted} records with a substitution"
        );
        for (id, (a, b)) in one.iter().zip(&many).enumerate() {
            assert_eq!(a, b, "{mode:?}, problem {id}: one token a step vs chunks");
        }
    }
}
