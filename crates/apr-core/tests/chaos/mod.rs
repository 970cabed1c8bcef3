//! A chaotic model for fuzzing the runtime: every slot's next token is a pseudo-random function
//! of the slot's context (and, if asked, of the thread's seed and position), biased to write the
//! protocol's markers, whole or broken off, anywhere. A toy task reads what it writes.
//!
//! Shared by the runtime's property tests and by `examples/fuzz_runtime.rs`.

#![allow(dead_code)]

use apr_core::decoder::uniform_at;
use apr_core::runtime::{run, Finish, Job, Mode, ProblemResult, RuntimeConfig};
use apr_core::scripted::ByteCodec;
use apr_core::SlotTable;
use apr_core::{
    BatchedDecoder, DecoderError, NodeId, Sampled, SlotId, StepInput, Task, TaskError, TextCodec,
};

/// Text fragments the model likes to write; it may stop any of them part way.
pub const FRAGMENTS: &[&str] = &[
    "\n<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,1\n<Start Sub Search 1 at level 1> Moving to Node #0,2\n<End Calling Sub Searches>\n",
    "\n<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,2\n<End Calling Sub Searches>\n",
    "<Sub Searches>\n",
    "<Sub Searches>",
    "<Calling Sub Searches>\n",
    "<End Calling Sub Searches>\n",
    "<Start Sub Search 0 at level 1> Moving to Node #0,1\n",
    "<Start Sub Search 1 at level 1> Moving to Node #0,2\n",
    "<Goal Reached in Sub Search 0 at level 1 at Node #0,1>\n",
    "<No Solution in Sub Search 1 at level 1 at Node #0,2>\n",
    "<End Sub Searches>\n",
    "Moving to Node #0,1\n",
    "Moving to Node #0,2\n",
    "Goal Reached\n",
    "<Sub Sear",
    "<<Sub Searches>",
    "Sub Searches>",
];

/// The model looks back this many tokens (more than the longest fragment).
const TAIL: usize = 192;

/// Bytes the model writes between fragments.
const FILLER: &[u8] = b"0123456789 +-*/=:,#[]<>\nNodeSubSearches";

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The chaotic model: a pool of byte-level slots.
pub struct ChaosModel {
    /// Each slot's tokens; their lengths are `table`'s.
    slots: Vec<Vec<u32>>,
    /// Rolling hash of each slot's tokens, kept in step with `slots`.
    hashes: Vec<Vec<u64>>,
    table: SlotTable,
    /// Whether draws depend on the thread's seed and position too.
    pub seeded: bool,
    /// Chance of EOS at a token (out of 1,000).
    pub eos_per_mille: u64,
}

impl ChaosModel {
    /// A model with `slots` slots of `context` tokens.
    pub fn new(slots: usize, context: usize) -> Self {
        ChaosModel {
            slots: vec![Vec::new(); slots],
            hashes: vec![Vec::new(); slots],
            table: SlotTable::new(slots, context),
            seeded: false,
            eos_per_mille: 15,
        }
    }

    /// The token after a context whose bytes (BOS removed) are `text` and whose rolling hash is
    /// `hash`.
    pub fn next(&self, text: &[u8], hash: u64) -> u32 {
        let codec = ByteCodec;
        let r = mix(hash);
        // A finished spawn block usually ends the turn.
        if text.ends_with(b"<End Calling Sub Searches>\n") && !r.is_multiple_of(3) {
            return codec.eos();
        }
        // Continue a fragment the context ends inside of, nearly always.
        if !r.is_multiple_of(60) {
            let mut best: Option<(&[u8], usize)> = None;
            for f in FRAGMENTS {
                let f = f.as_bytes();
                let longest = best.map_or(1, |(_, len)| len + 1);
                let last = text.last().copied();
                for len in (longest..f.len()).rev() {
                    if Some(f[len - 1]) == last && text.ends_with(&f[..len]) {
                        best = Some((f, len));
                        break;
                    }
                }
            }
            if let Some((f, len)) = best {
                return f[len] as u32 + 3;
            }
        }
        let r2 = mix(r ^ 0x5555);
        if r2 % 1000 < self.eos_per_mille {
            return codec.eos();
        }
        if r2.is_multiple_of(8) {
            // Start a fragment.
            let f = FRAGMENTS[(r2 >> 8) as usize % FRAGMENTS.len()];
            return f.as_bytes()[0] as u32 + 3;
        }
        FILLER[(r2 >> 16) as usize % FILLER.len()] as u32 + 3
    }

    fn hash_after(prev: u64, token: u32) -> u64 {
        mix(prev ^ (token as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn text_of(tokens: &[u32]) -> Vec<u8> {
        tokens
            .iter()
            .filter(|&&t| t >= 3)
            .map(|&t| (t - 3) as u8)
            .collect()
    }
}

impl BatchedDecoder for ChaosModel {
    fn table(&self) -> &SlotTable {
        &self.table
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.table.check(inputs)?;
        self.table.append(inputs);
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            let slot = input.slot;
            for &t in input.tokens {
                let prev = self.hashes[slot].last().copied().unwrap_or(0);
                self.hashes[slot].push(Self::hash_after(prev, t));
                self.slots[slot].push(t);
            }
            let mut hash = *self.hashes[slot].last().expect("a step appends");
            if self.seeded {
                let position = self.slots[slot].len();
                hash ^= (uniform_at(input.seed, position) * (1u64 << 53) as f64) as u64;
            }
            let tokens = &self.slots[slot];
            let text = Self::text_of(&tokens[tokens.len().saturating_sub(TAIL)..]);
            out.push(Sampled {
                token: self.next(&text, hash),
                logprob: -((hash % 1000) as f32) / 100.0,
            });
        }
        Ok(out)
    }
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        // Stricter than the engines: the runtime never rewinds past what a slot holds.
        let held = self.table.slot_len(slot);
        if len > held {
            return Err(DecoderError::Backend(format!(
                "truncate to {len} beyond {held}"
            )));
        }
        self.table.truncate(slot, len)?;
        self.slots[slot].truncate(len);
        self.hashes[slot].truncate(len);
        Ok(())
    }
    fn release(&mut self, slot: SlotId) {
        if self.table.release(slot) {
            self.slots[slot].clear();
            self.hashes[slot].clear();
        }
    }
}

/// What the reference's decode loop (spec §6.1) makes of `prompt` with the unseeded model: it
/// decodes until EOS; whenever the text it wrote contains `<Sub Searches>`, it cuts the text
/// there, appends `<Calling Sub Searches>` to the prompt and decodes again from the new prompt.
/// Returns the text after `prompt`, or `None` if it ran past `limit` tokens.
pub fn reference_decode(model: &ChaosModel, prompt: &str, limit: usize) -> Option<String> {
    let codec = ByteCodec;
    let mut context = prompt.to_owned();
    let mut written = String::new();
    // The call's tokens and their rolling hash, rebuilt after each substitution.
    let start = |context: &str| -> Option<(Vec<u32>, u64)> {
        let mut tokens = vec![codec.bos()];
        tokens.extend(codec.encode(context).ok()?);
        let hash = tokens.iter().fold(0, |h, &t| ChaosModel::hash_after(h, t));
        Some((tokens, hash))
    };
    let (mut tokens, mut hash) = start(&context)?;
    loop {
        if tokens.len() >= limit {
            return None;
        }
        let text = ChaosModel::text_of(&tokens[tokens.len().saturating_sub(TAIL)..]);
        let next = model.next(&text, hash);
        if next == codec.eos() {
            context.push_str(&written);
            return Some(context[prompt.len()..].to_owned());
        }
        written.push_str(codec.piece(next));
        tokens.push(next);
        hash = ChaosModel::hash_after(hash, next);
        if let Some(i) = written.find("<Sub Searches>") {
            context.push_str(&written[..i]);
            context.push_str("<Calling Sub Searches>");
            written.clear();
            (tokens, hash) = start(&context)?;
        }
    }
}

/// A toy task over the chaotic model's text: a child explores a node the parent mentioned and
/// returns its last `Goal Reached` line.
pub struct ToyTask;

impl Task for ToyTask {
    type Problem = u64;

    fn parent_prompt(&self, problem: &u64) -> String {
        format!("Problem {problem}\n")
    }
    fn child_prompt(&self, parent_text: &str, node: &NodeId) -> Result<String, TaskError> {
        if parent_text.contains(&format!("Node #{node}\n")) {
            Ok(format!("Moving to Node #{node}\n"))
        } else {
            Err(TaskError::UnknownNode(node.clone()))
        }
    }
    fn join_message(&self, child_text: &str) -> Option<String> {
        child_text
            .lines()
            .rev()
            .find(|l| l.contains("Goal Reached"))
            .map(str::to_owned)
    }
    fn final_answer(&self, root_text: &str) -> Option<String> {
        self.join_message(root_text)
    }
    fn reward(&self, _: &u64, answer: Option<&str>) -> f32 {
        f32::from(answer.is_some())
    }
}

/// A runtime configuration for fuzzing: small context and budgets, so that every limit is hit.
pub fn fuzz_config(mode: Mode) -> RuntimeConfig {
    RuntimeConfig {
        mode,
        context: 1_000,
        max_children: 4,
        max_spawn_rounds: 3,
        max_total_tokens: 8_000,
        ..RuntimeConfig::default()
    }
}

/// Runs `problems` problems (seeds from `first`) through the runtime on the chaotic model.
pub fn run_chaos(
    mode: Mode,
    first: u64,
    problems: usize,
    slots: usize,
    seeded: bool,
) -> (Vec<ProblemResult>, ChaosModel) {
    run_chaos_with(mode, first, problems, slots, seeded, 15)
}

/// [`run_chaos`] with a chance of EOS per token (out of 1,000): higher makes shorter outputs.
pub fn run_chaos_with(
    mode: Mode,
    first: u64,
    problems: usize,
    slots: usize,
    seeded: bool,
    eos_per_mille: u64,
) -> (Vec<ProblemResult>, ChaosModel) {
    let config = fuzz_config(mode);
    let mut model = ChaosModel::new(slots, config.context);
    model.seeded = seeded;
    model.eos_per_mille = eos_per_mille;
    let jobs = (0..problems)
        .map(|i| Job {
            id: i,
            problem: first + i as u64,
            seed: first + i as u64,
        })
        .collect();
    (run_toy(&mut model, jobs, &config), model)
}

/// Runs `jobs` of the [`ToyTask`] on `decoder` with byte tokens.
pub fn run_toy(
    decoder: &mut dyn BatchedDecoder,
    jobs: Vec<Job<u64>>,
    config: &RuntimeConfig,
) -> Vec<ProblemResult> {
    run(&ToyTask, decoder, &ByteCodec, jobs, config, &mut |_| {})
}

/// Counts of what a fuzz run saw.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Problems run.
    pub problems: usize,
    /// Model outputs (segments).
    pub outputs: usize,
    /// Substitutions the runtime made.
    pub substitutions: usize,
    /// Segments whose text matched the reference decode loop exactly.
    pub matched_reference: usize,
    /// Problems that ended in a failure (any reason).
    pub failures: usize,
}

impl Tally {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &Tally) {
        self.problems += other.problems;
        self.outputs += other.outputs;
        self.substitutions += other.substitutions;
        self.matched_reference += other.matched_reference;
        self.failures += other.failures;
    }
}

/// Checks every invariant of a result; returns a description of the first broken one.
pub fn check(model: &ChaosModel, result: &ProblemResult, tally: &mut Tally) -> Result<(), String> {
    tally.problems += 1;
    let codec = ByteCodec;
    if let Some(f) = result.failure.as_ref().map(ToString::to_string) {
        tally.failures += 1;
        for bad in [
            "encode",
            "tokeniz",
            "substitution",
            "lost its slot",
            "decoder",
        ] {
            if f.contains(bad) {
                return Err(format!("problem {}: runtime failure {f:?}", result.id));
            }
        }
    }
    for seg in &result.segments {
        tally.outputs += 1;
        if seg.output.contains("<Sub Searches>") {
            return Err(format!("problem {}: output holds a join marker", result.id));
        }
        let text: String = seg.tokens.iter().map(|&t| codec.piece(t)).collect();
        if text != seg.output {
            return Err(format!("problem {}: tokens and output disagree", result.id));
        }
        if seg.tokens.len() != seg.logprobs.len() || seg.tokens.len() != seg.sampled.len() {
            return Err(format!(
                "problem {}: per-token records differ in length",
                result.id
            ));
        }
        let prompt: String = seg.prompt_tokens.iter().map(|&t| codec.piece(t)).collect();
        if prompt != seg.prompt || seg.prompt_tokens.first() != Some(&codec.bos()) {
            return Err(format!(
                "problem {}: prompt tokens and prompt disagree",
                result.id
            ));
        }
        // Each run of injected tokens is one substitution.
        tally.substitutions += seg
            .sampled
            .iter()
            .zip(std::iter::once(&true).chain(&seg.sampled))
            .filter(|(now, before)| !**now && **before)
            .count();
        if !model.seeded && matches!(seg.finish, Finish::Eos | Finish::Spawn) {
            match reference_decode(model, &seg.prompt, model.context_limit() + 1) {
                Some(reference) if reference == seg.output => tally.matched_reference += 1,
                other => {
                    return Err(format!(
                        "problem {}: segment {:?} differs from the reference loop:\n{:?}\nvs\n{:?}",
                        result.id, seg.prompt, seg.output, other
                    ))
                }
            }
        }
    }
    Ok(())
}
