//! Dataset validation: replays a trace file through our grammar and task, and checks every
//! child prompt, every join and every solved answer.

use apr_core::{ends_with_spawn, join_context, split_spawn, JoinBlock, JoinEntry, Mode, Task};
use rayon::prelude::*;
use serde::Serialize;

use crate::record::TraceRecord;
use crate::search::TraceDict;
use crate::task::{root_prompt, CountdownTask};
use crate::verify::{final_answer, verify_trace};

/// The outcome of validating a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ValidationSummary {
    /// Records read.
    pub records: usize,
    /// Records whose calls agree with our grammar and whose answer (if solved) verifies.
    pub consistent: usize,
    /// The others.
    pub inconsistent: usize,
    /// Records whose search reached the goal.
    pub solved: usize,
    /// Solved records whose final answer passes the strict verifier.
    pub verified: usize,
    /// The first few mismatches, one line each.
    pub mismatches: Vec<String>,
}

/// How many mismatch messages to keep.
pub const MAX_MISMATCHES: usize = 10;

/// Validates records (see [`check_record`]).
pub fn validate(records: &[TraceRecord]) -> ValidationSummary {
    let mut validator = Validator::default();
    validator.add(records);
    validator.finish()
}

/// Validation of a file read chunk by chunk: [`Validator::add`] each chunk in file order, then
/// [`Validator::finish`]. Records of a chunk are checked in parallel; the summary (mismatches in
/// file order included) does not depend on the chunking or the thread count.
#[derive(Clone, Debug, Default)]
pub struct Validator {
    summary: ValidationSummary,
}

impl Validator {
    /// Checks the next records of the file.
    pub fn add(&mut self, records: &[TraceRecord]) {
        let outcomes: Vec<(bool, bool, Option<String>)> = records
            .par_iter()
            .map(|record| {
                let solved = record.solved();
                let verified = solved && verify_trace(&record.problem(), &record.search_path);
                let mut problem = check_record(record).err();
                if problem.is_none() && solved && !verified {
                    problem = Some("solved search_path fails the strict verifier".to_owned());
                }
                (solved, verified, problem)
            })
            .collect();
        let summary = &mut self.summary;
        for (solved, verified, problem) in outcomes {
            let index = summary.records;
            summary.records += 1;
            summary.solved += solved as usize;
            summary.verified += verified as usize;
            match problem {
                None => summary.consistent += 1,
                Some(message) => {
                    summary.inconsistent += 1;
                    if summary.mismatches.len() < MAX_MISMATCHES {
                        summary
                            .mismatches
                            .push(format!("record {index}: {message}"));
                    }
                }
            }
        }
    }

    /// The summary of everything added.
    pub fn finish(self) -> ValidationSummary {
        self.summary
    }
}

/// Checks one record's structure: the prompt, and for APR every spawn round (child prompts are
/// what our grammar derives from the parent's spawn block; the next parent call starts with the
/// pre-spawn text plus our join block).
pub fn check_record(record: &TraceRecord) -> Result<(), String> {
    let problem = record.problem();
    match record.kind() {
        Mode::Serial => {
            let prompt = root_prompt(&problem, Mode::Serial);
            expect_prefix(&record.search_path, &prompt, "search_path")
        }
        Mode::Apr => {
            let dict = record
                .trace_dict
                .as_ref()
                .expect("APR record has a trace_dict");
            let prompt = root_prompt(&problem, Mode::Apr);
            let first = dict
                .main_calls
                .first()
                .ok_or("trace_dict has no main call")?;
            expect_prefix(first, &prompt, "main call 0")?;
            if dict.main_calls.last() != Some(&record.search_path) {
                return Err("search_path is not the last main call".to_owned());
            }
            check_dict(dict, "")
        }
    }
}

fn check_dict(dict: &TraceDict, path: &str) -> Result<(), String> {
    let task = CountdownTask::apr();
    let calls = &dict.main_calls;
    if dict.sub_calls.len() + 1 != calls.len() {
        return Err(format!(
            "{path}{} main calls but {} spawn rounds",
            calls.len(),
            dict.sub_calls.len()
        ));
    }
    for (round, children) in dict.sub_calls.iter().enumerate() {
        let call = &calls[round];
        let here = format!("{path}main call {round}");
        if !ends_with_spawn(call) {
            return Err(format!("{here} does not end with a spawn block"));
        }
        let split = split_spawn(call).map_err(|e| format!("{here}: {e}"))?;
        if split.block.children.len() != children.len() {
            return Err(format!(
                "{here} spawns {} children but {} child traces follow",
                split.block.children.len(),
                children.len()
            ));
        }
        let mut entries = Vec::with_capacity(children.len());
        for (k, (node, child)) in split.block.children.iter().zip(children).enumerate() {
            let child_here = format!("{here} child {k} (#{node})");
            let prompt = task
                .child_prompt(call, node)
                .map_err(|e| format!("{child_here}: {e}"))?;
            let child_first = child
                .main_calls
                .first()
                .ok_or_else(|| format!("{child_here} has no call"))?;
            expect_prefix(child_first, &prompt, &child_here)?;
            check_dict(child, &format!("{child_here} "))?;
            let last = child.main_calls.last().map(String::as_str).unwrap_or("");
            entries.push(JoinEntry {
                node: node.clone(),
                result: final_answer(last).map(str::to_owned),
            });
        }
        let expected = join_context(
            split.before,
            &JoinBlock {
                level: split.block.level,
                entries,
            },
        );
        expect_prefix(
            &calls[round + 1],
            &expected,
            &format!("{path}main call {}", round + 1),
        )?;
    }
    if let Some(last) = calls.last() {
        if ends_with_spawn(last) {
            return Err(format!("{path}last main call ends with a spawn block"));
        }
    }
    Ok(())
}

fn expect_prefix(text: &str, prefix: &str, what: &str) -> Result<(), String> {
    if text.starts_with(prefix) {
        return Ok(());
    }
    let at = text
        .bytes()
        .zip(prefix.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let snippet = |s: &str| -> String {
        let start = s.floor_char_boundary(at.saturating_sub(20));
        let end = s.floor_char_boundary((at + 40).min(s.len()));
        s[start..end].replace('\n', "\\n")
    };
    Err(format!(
        "{what} differs from the expected text at byte {at}: expected …{}…, found …{}…",
        snippet(prefix),
        snippet(text)
    ))
}
