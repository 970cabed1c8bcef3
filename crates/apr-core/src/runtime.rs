//! The APR runtime (spec §6): many thread trees decoded together through one batched decoder.
//!
//! Every live thread of every problem (parents and children) holds a slot; each scheduler step
//! prefills the threads that have new context (prompts, join blocks) in one batched pass and
//! decodes one token for every other live thread in another. A finished thread's slot goes at
//! once to the next waiting thread (continuous batching).
//!
//! A parent decodes until EOS (or its context limit). If its text then ends with a spawn block it
//! waits, keeping its slot and KV state, while one child per named node runs on the prompt the
//! [`Task`] derives. When the last child ends, the parent's slot is truncated to the text before
//! `<Calling Sub Searches>` and only the join block is prefilled: the KV prefix is reused. If a
//! parent ever writes `<Sub Searches>` itself, the runtime cuts it and substitutes
//! `<Calling Sub Searches>`, as the reference does. Whatever a model writes, a problem either
//! finishes or fails with a recorded reason; the runtime never panics and never stalls a batch.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::decoder::{BatchedDecoder, Horizon, Sampling, SlotId, StepInput, TextCodec};
use crate::grammar::{
    ends_with_spawn, join_context, split_spawn, Conditioning, JoinBlock, JoinEntry, JOIN_OPEN,
    SPAWN_OPEN,
};
use crate::stop::StopDetector;
use crate::task::Task;

/// How problems are solved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Adaptive Parallel Reasoning: parents spawn children.
    Apr,
    /// One thread per problem (SoS+); a spawn block is just text.
    Serial,
}

/// Budgets and decoding settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// APR or serial.
    pub mode: Mode,
    /// Tokens per thread (prompt included); a thread reaching it ends with `context_limit`.
    pub context: usize,
    /// Most children one spawn may name.
    pub max_children: usize,
    /// Most spawn rounds per problem.
    pub max_spawn_rounds: usize,
    /// Most tokens a problem may process in all (every thread's prompt and output). The
    /// children of a spawn share what the parent has left equally, so that where a budget runs out
    /// never depends on how threads were batched: a child that uses up its share ends with
    /// [`Finish::Budget`], a root thread fails the problem.
    pub max_total_tokens: usize,
    /// Wall-clock limit per problem.
    pub timeout: Option<Duration>,
    /// Sampling of every thread.
    pub sampling: Sampling,
    /// Prefixes of the root prompt (`Sub Call Budget: N `, `Token Budget: B `).
    pub conditioning: Conditioning,
    /// Let children spawn too (the reference never does).
    pub nested: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            mode: Mode::Apr,
            context: 4096,
            max_children: 16,
            max_spawn_rounds: 8,
            max_total_tokens: 200_000,
            timeout: None,
            sampling: Sampling::GREEDY,
            conditioning: Conditioning::default(),
            nested: false,
        }
    }
}

/// One problem to solve; `seed` seeds its threads' sampling.
#[derive(Clone, Debug)]
pub struct Job<P> {
    /// Caller's id, copied to the result.
    pub id: usize,
    /// The problem.
    pub problem: P,
    /// Sampling seed of the tree (each thread derives its own).
    pub seed: u64,
}

/// Why a thread segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model wrote EOS.
    Eos,
    /// The model wrote EOS after a spawn block: the segment hands over to children.
    Spawn,
    /// The thread reached the per-thread context.
    ContextLimit,
    /// A child used up its share of the problem's token budget.
    Budget,
    /// The problem was stopped (budget, timeout, error elsewhere in its tree).
    Cancelled,
}

/// Who a segment belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The root thread.
    Parent,
    /// A child thread.
    Child,
}

/// One LM call: a thread from a runtime-supplied context to its end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Parent or child.
    pub role: Role,
    /// For a parent: its call number (0, then one per join). For a child: the spawn round.
    pub round: usize,
    /// For a child: its index in the spawn block.
    pub index: usize,
    /// For a child: the node it explores.
    pub node: Option<String>,
    /// The context the runtime supplied (prompt, or pre-spawn text plus join block).
    pub prompt: String,
    /// What the model wrote (with any runtime substitution).
    pub output: String,
    /// Why it ended.
    pub finish: Finish,
    /// Context tokens when generation started (BOS included).
    pub prompt_tokens: Vec<u32>,
    /// Tokens after the prompt.
    pub tokens: Vec<u32>,
    /// Log-probability of each of `tokens` when sampled (τ = 1; 0 for runtime-injected ones).
    pub logprobs: Vec<f32>,
    /// Whether each of `tokens` was written by the model (false: injected by the runtime).
    pub sampled: Vec<bool>,
    /// Prompt tokens carried over from the call before (the pre-spawn prefix at a join): kept in
    /// the slot's KV cache, or replayed if the parent lent its slot to its children. Either way
    /// they are counted once in [`Metrics::total_tokens`].
    pub reused_prefix: usize,
}

impl Segment {
    /// Context length at the end: prompt plus output tokens.
    pub fn len(&self) -> usize {
        self.prompt_tokens.len() + self.tokens.len()
    }

    /// Whether the segment holds no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Metrics of one problem, counted as the paper does (spec §6.2), in tokens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Every call's length (+1 for EOS), the repeated parent prefix counted once.
    pub total_tokens: usize,
    /// The longest single call.
    pub longest_thread: usize,
    /// Parent calls plus the longest child of each spawn round.
    pub sequential_tokens: usize,
    /// Child threads.
    pub children: usize,
    /// Spawn rounds.
    pub spawn_rounds: usize,
    /// Tokens prefilled into slots (prompts and join blocks).
    pub prefilled_tokens: usize,
    /// Tokens sampled.
    pub generated_tokens: usize,
    /// Wall-clock seconds from admission to the end.
    pub latency_s: f64,
}

/// The outcome of one problem.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    /// The job's id.
    pub id: usize,
    /// The root prompt (with conditioning).
    pub prompt: String,
    /// Every segment, depth-first through the thread tree: a parent call, the children it
    /// spawned (by index), the next parent call. The order does not depend on batching.
    pub segments: Vec<Segment>,
    /// The final answer, if the root stated one.
    pub answer: Option<String>,
    /// Reward of the answer (1 correct).
    pub reward: f32,
    /// Why the problem failed, if it did (malformed spawn, budget, timeout, context, …).
    pub failure: Option<String>,
    /// Metrics.
    pub metrics: Metrics,
}

impl ProblemResult {
    /// Whether the verified answer is correct.
    pub fn correct(&self) -> bool {
        self.reward > 0.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ThreadState {
    /// Needs a slot (to start, or to resume after eviction).
    Queued,
    /// Holds a slot and decodes.
    Running,
    /// Holds (or has lost) its slot while its children run.
    Waiting,
    Done,
}

struct Thread {
    problem: usize,
    role: Role,
    parent: Option<usize>,
    round: usize,
    index: usize,
    node: Option<crate::grammar::NodeId>,
    /// Where the thread sits in its problem's tree: the parent's key, then `2·call + 1` and the
    /// child's index (the root's is empty). It orders segments and seeds sampling, so both depend
    /// only on the tree, never on which thread happened to be admitted first.
    tree_key: Vec<usize>,
    seed: u64,
    state: ThreadState,
    slot: Option<SlotId>,
    /// Context tokens now in the slot (BOS first).
    tokens: Vec<u32>,
    /// Text length after each token of `tokens` (BOS adds nothing).
    text_ends: Vec<usize>,
    /// Full context text.
    text: String,
    /// Tokens to append at the next step.
    pending: Vec<u32>,
    /// Whether `pending` tokens were sampled (true) or supplied by the runtime.
    pending_sampled: Option<f32>,
    /// Leading `pending` tokens that replay a context an evicted parent already held: compute,
    /// not new tokens, so they count toward no budget or metric.
    replayed: usize,
    /// Tokens this thread may process, its children's included.
    allowance: usize,
    /// Tokens it has processed so far, those of its finished children included.
    processed: usize,
    /// Current segment.
    segment_prompt: String,
    segment_prompt_tokens: Option<usize>,
    segment_start_text: usize,
    out_tokens: Vec<u32>,
    out_logprobs: Vec<f32>,
    out_sampled: Vec<bool>,
    reused_prefix: usize,
    stop: StopDetector,
    /// Children of the current spawn round, and how many have ended.
    children: Vec<usize>,
    children_done: usize,
    spawn_rounds: usize,
    segment_count: usize,
}

struct ProblemState<P> {
    job: Job<P>,
    prompt: String,
    root: Option<usize>,
    started: Option<Instant>,
    /// Segments as they ended, each with its [`segment_key`].
    segments: Vec<(Vec<usize>, Segment)>,
    failure: Option<String>,
    done: bool,
    live_threads: usize,
    prefilled: usize,
    generated: usize,
    /// Per spawn round: lengths of its children, for sequential tokens.
    round_children: Vec<Vec<usize>>,
    /// Its threads, in creation order.
    threads: Vec<usize>,
}

/// Runs jobs to completion and returns one result per job, in job order.
///
/// `progress` is called after each finished problem with the number done.
pub fn run<T: Task, D: BatchedDecoder + ?Sized, C: TextCodec + ?Sized>(
    task: &T,
    decoder: &mut D,
    codec: &C,
    jobs: Vec<Job<T::Problem>>,
    config: &RuntimeConfig,
    progress: &mut dyn FnMut(usize),
) -> Vec<ProblemResult> {
    let mut rt = Runtime {
        task,
        codec,
        config,
        context: config.context.min(decoder.context_limit()).max(2),
        problems: jobs
            .into_iter()
            .map(|job| ProblemState {
                prompt: format!(
                    "{}{}",
                    config.conditioning.prefix(),
                    task.parent_prompt(&job.problem)
                ),
                job,
                root: None,
                started: None,
                segments: Vec::new(),
                failure: None,
                done: false,
                live_threads: 0,
                prefilled: 0,
                generated: 0,
                round_children: Vec::new(),
                threads: Vec::new(),
            })
            .collect(),
        threads: Vec::new(),
        free_slots: (0..decoder.slots()).rev().collect(),
        owners: vec![None; decoder.slots()],
        in_flight: Vec::new(),
        next_problem: 0,
        finished: 0,
        ready: VecDeque::new(),
    };
    rt.drive(decoder, progress);
    rt.problems
        .into_iter()
        .map(|p| finish_problem(task, p))
        .collect()
}

struct Runtime<'a, T: Task, C: TextCodec + ?Sized> {
    task: &'a T,
    codec: &'a C,
    config: &'a RuntimeConfig,
    context: usize,
    problems: Vec<ProblemState<T::Problem>>,
    threads: Vec<Thread>,
    free_slots: Vec<SlotId>,
    /// The thread holding each slot: every step looks only at these, never at all threads.
    owners: Vec<Option<usize>>,
    /// Problems admitted and not yet done.
    in_flight: Vec<usize>,
    next_problem: usize,
    finished: usize,
    /// Threads waiting for a slot, children and resumes first.
    ready: VecDeque<usize>,
}

/// A thread's sampling seed: the problem's seed mixed with the thread's place in the tree.
fn thread_seed(problem_seed: u64, tree_key: &[usize]) -> u64 {
    let mut z = problem_seed;
    for &k in std::iter::once(&usize::MAX).chain(tree_key) {
        z ^= (k as u64)
            .wrapping_add(1)
            .wrapping_mul(0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 29;
    }
    z
}

/// Where a segment goes in its problem's record: depth-first through the tree, so that a parent
/// call comes before the children it spawned and they come before the call after the join.
fn segment_key(tree_key: &[usize], call: usize) -> Vec<usize> {
    let mut key = tree_key.to_vec();
    key.push(2 * call);
    key
}

impl<T: Task, C: TextCodec + ?Sized> Runtime<'_, T, C> {
    fn drive<D: BatchedDecoder + ?Sized>(
        &mut self,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let total = self.problems.len();
        while self.finished < total {
            self.check_timeouts(decoder, progress);
            self.admit(decoder, progress);
            let running: Vec<usize> = self
                .owners
                .iter()
                .flatten()
                .copied()
                .filter(|&t| {
                    let th = &self.threads[t];
                    th.state == ThreadState::Running && !th.pending.is_empty()
                })
                .collect();
            if running.is_empty() {
                // Admission did all it could and nothing runs: no progress is possible (e.g. a
                // decoder without slots). Fail what is left rather than spin.
                for p in 0..total {
                    if !self.problems[p].done {
                        self.fail(
                            p,
                            "runtime stalled: no slot available".into(),
                            decoder,
                            progress,
                        );
                    }
                }
                continue;
            }
            // Prefill rows (several tokens) and decode rows (one token) go in separate passes so
            // that one long prompt does not pad every decode row.
            let (prefill, decode): (Vec<usize>, Vec<usize>) = running
                .into_iter()
                .partition(|&t| self.threads[t].pending.len() > 1);
            for group in [prefill, decode] {
                if group.is_empty() {
                    continue;
                }
                self.step(group, decoder, progress);
            }
        }
    }

    fn step<D: BatchedDecoder + ?Sized>(
        &mut self,
        group: Vec<usize>,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let inputs: Vec<StepInput> = group
            .iter()
            .map(|&t| {
                let th = &self.threads[t];
                StepInput {
                    slot: th.slot.expect("running threads hold a slot"),
                    tokens: &th.pending,
                    sampling: self.config.sampling,
                    seed: th.seed,
                }
            })
            .collect();
        let horizons: Vec<Horizon> = group.iter().map(|&t| self.horizon(t)).collect();
        let chunks = decoder.step_many(&inputs, &horizons);
        for (&t, chunk) in group.iter().zip(chunks) {
            let p = self.threads[t].problem;
            match chunk {
                Ok(chunk) => {
                    for (j, s) in chunk.iter().enumerate() {
                        let th = &self.threads[t];
                        // Stop taking a chunk's tokens once the thread has moved on: it ended, its
                        // problem was cancelled (by an earlier thread of the same problem), or the
                        // runtime rewrote its text (a substitution queued injected tokens).
                        let continues = th.state == ThreadState::Running
                            && (j == 0
                                || (th.pending_sampled.is_some()
                                    && th.pending == [chunk[j - 1].token]));
                        if !continues {
                            break;
                        }
                        self.accept(t, s.token, s.logprob, decoder, progress);
                    }
                }
                // A failed call fails its problem, never the whole run.
                Err(e) => {
                    if !self.problems[p].done {
                        self.fail(p, format!("decoder error: {e}"), decoder, progress);
                    }
                }
            }
        }
    }

    /// How many tokens a running thread can take before its context or its share of the
    /// budget ends it, and where the runtime would rewrite its text.
    fn horizon(&self, t: usize) -> Horizon {
        const STOPS: &[&str] = &[JOIN_OPEN];
        let th = &self.threads[t];
        let held = th.tokens.len() + th.pending.len();
        let processed = th.processed + th.pending.len() - th.replayed.min(th.pending.len());
        let budget = th.allowance.saturating_sub(processed) + 1;
        Horizon {
            max_tokens: self.context.saturating_sub(held).min(budget).max(1),
            stop: STOPS,
            affinity: self.problems[th.problem].job.id as u64,
        }
    }

    /// Admits threads into free slots: queued children and resumes first, then new problems.
    fn admit<D: BatchedDecoder + ?Sized>(
        &mut self,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        while let Some(&t) = self.ready.front() {
            if self.free_slots.is_empty() && !self.evict_waiting_parent(decoder) {
                return;
            }
            self.ready.pop_front();
            if self.threads[t].state == ThreadState::Done {
                continue;
            }
            let slot = self.free_slots.pop().expect("a slot is free");
            self.start_in_slot(t, slot, decoder, progress);
        }
        while self.next_problem < self.problems.len() && !self.free_slots.is_empty() {
            let p = self.next_problem;
            self.next_problem += 1;
            self.problems[p].started = Some(Instant::now());
            self.in_flight.push(p);
            let prompt = self.problems[p].prompt.clone();
            let t = self.new_thread(p, Role::Parent, None, 0, 0, None, prompt);
            self.problems[p].root = Some(t);
            let slot = self.free_slots.pop().expect("a slot is free");
            self.start_in_slot(t, slot, decoder, progress);
        }
    }

    /// Frees the slot of a parent waiting for its children (it will re-prefill its context on
    /// resume). Returns false if there is none.
    fn evict_waiting_parent<D: BatchedDecoder + ?Sized>(&mut self, decoder: &mut D) -> bool {
        let victim = self.owners.iter().flatten().copied().find(|&t| {
            let th = &self.threads[t];
            th.state == ThreadState::Waiting && th.slot.is_some()
        });
        match victim {
            Some(v) => {
                // Its tokens stay: on resume they are replayed exactly, so the model sees the
                // same context whether or not the parent kept its slot.
                let slot = self.threads[v].slot.take().expect("victim holds a slot");
                decoder.release(slot);
                self.owners[slot] = None;
                self.free_slots.push(slot);
                true
            }
            None => false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_thread(
        &mut self,
        problem: usize,
        role: Role,
        parent: Option<usize>,
        round: usize,
        index: usize,
        node: Option<crate::grammar::NodeId>,
        prompt: String,
    ) -> usize {
        let id = self.threads.len();
        self.problems[problem].live_threads += 1;
        self.problems[problem].threads.push(id);
        let tree_key = match parent {
            Some(parent) => {
                let parent = &self.threads[parent];
                // The spawning call has just been recorded, so it is call `segment_count - 1`.
                let call = parent.segment_count.saturating_sub(1);
                let mut key = parent.tree_key.clone();
                key.extend([2 * call + 1, index]);
                key
            }
            None => Vec::new(),
        };
        let seed = thread_seed(self.problems[problem].job.seed, &tree_key);
        self.threads.push(Thread {
            problem,
            role,
            parent,
            round,
            index,
            node,
            tree_key,
            seed,
            state: ThreadState::Queued,
            slot: None,
            tokens: Vec::new(),
            text_ends: Vec::new(),
            text: String::new(),
            pending: Vec::new(),
            pending_sampled: None,
            replayed: 0,
            allowance: self.config.max_total_tokens,
            processed: 0,
            segment_prompt: prompt,
            segment_prompt_tokens: None,
            segment_start_text: 0,
            out_tokens: Vec::new(),
            out_logprobs: Vec::new(),
            out_sampled: Vec::new(),
            reused_prefix: 0,
            stop: StopDetector::new(&[JOIN_OPEN]),
            children: Vec::new(),
            children_done: 0,
            spawn_rounds: 0,
            segment_count: 0,
        });
        id
    }

    /// Gives a thread a slot and queues its context: the whole segment prompt for a fresh
    /// thread; a resumed parent's context was queued by [`Self::join`].
    fn start_in_slot<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        slot: SlotId,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        decoder.release(slot);
        self.owners[slot] = Some(t);
        let th = &mut self.threads[t];
        th.slot = Some(slot);
        th.state = ThreadState::Running;
        if !th.pending.is_empty() {
            return; // a resumed parent: `join` queued its replay and join block
        }
        th.text = th.segment_prompt.clone();
        th.tokens.clear();
        th.text_ends.clear();
        match self.codec.encode(&th.text) {
            Ok(tokens) => {
                let mut pending = vec![self.codec.bos()];
                pending.extend(tokens);
                th.pending = pending;
                th.pending_sampled = None;
                th.segment_start_text = th.text.len();
                th.stop.restart(th.segment_start_text);
                if th.pending.len() + 1 > self.context {
                    let p = th.problem;
                    self.fail(p, "prompt exceeds the context".into(), decoder, progress);
                }
            }
            Err(e) => {
                let p = th.problem;
                self.fail(
                    p,
                    format!("prompt cannot be tokenized: {e}"),
                    decoder,
                    progress,
                );
            }
        }
    }

    /// Takes one sampled token for a running thread.
    fn accept<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        token: u32,
        logprob: f32,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let eos = self.codec.eos();
        let p = self.threads[t].problem;
        {
            let th = &mut self.threads[t];
            // The pending tokens are now in the slot.
            let pending = std::mem::take(&mut th.pending);
            let mut end = th.text_ends.last().copied().unwrap_or(0);
            // Tokens the runtime supplied (prompt, join block, substitution) count as prefilled;
            // a single pending sampled token is the previous step's output.
            let supplied = th.pending_sampled.take().is_none();
            if th.segment_prompt_tokens.is_none() {
                th.segment_prompt_tokens = Some(th.tokens.len() + pending.len());
            }
            for (i, &tok) in pending.iter().enumerate() {
                if !(th.tokens.is_empty() && i == 0 && tok == self.codec.bos()) {
                    end += self.codec.piece(tok).len();
                }
                th.tokens.push(tok);
                th.text_ends.push(end);
            }
            let new_tokens = pending.len() - std::mem::take(&mut th.replayed);
            th.processed += new_tokens;
            if supplied {
                self.problems[p].prefilled += new_tokens;
            }
        }
        self.problems[p].generated += 1;
        if token == eos {
            self.end_segment(t, decoder, progress);
            return;
        }
        let piece = self.codec.piece(token).to_owned();
        let th = &mut self.threads[t];
        th.text.push_str(&piece);
        th.out_tokens.push(token);
        th.out_logprobs.push(logprob);
        th.out_sampled.push(true);
        th.pending = vec![token];
        th.pending_sampled = Some(logprob);
        if let Some(hit) = th.stop.push(&piece) {
            // The model tried to write the join block itself: cut it and substitute the spawn
            // opener (reference `decode_trace`), then let it continue. The detector holds
            // offsets into `text`, so the cut is exact however many substitutions came before.
            let cut = hit.start;
            if let Err(reason) = self.substitute(t, cut, decoder) {
                self.fail(p, reason, decoder, progress);
                return;
            }
        }
        let th = &self.threads[t];
        if th.tokens.len() + th.pending.len() >= self.context {
            self.end_segment_with(t, Finish::ContextLimit, decoder, progress);
            return;
        }
        if th.processed + 1 > th.allowance {
            match th.role {
                Role::Child => self.end_segment_with(t, Finish::Budget, decoder, progress),
                Role::Parent => {
                    self.fail(p, "total token budget exhausted".into(), decoder, progress)
                }
            }
        }
    }

    /// Replaces the text from byte `cut` with `<Calling Sub Searches>`: truncates the slot to the
    /// last token boundary at or before `cut` and queues the rest as injected tokens.
    fn substitute<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        cut: usize,
        decoder: &mut D,
    ) -> Result<(), String> {
        let th = &mut self.threads[t];
        // Tokens in the slot whose text ends at or before the cut (the last sampled token is
        // still pending, not in the slot).
        let keep = th
            .text_ends
            .iter()
            .take_while(|&&e| e <= cut)
            .count()
            .max(1);
        let boundary = th.text_ends[keep - 1];
        let slot = th.slot.ok_or("thread lost its slot")?;
        decoder.truncate(slot, keep).map_err(|e| e.to_string())?;
        th.tokens.truncate(keep);
        th.text_ends.truncate(keep);
        let redo = format!("{}{}", &th.text[boundary..cut], SPAWN_OPEN);
        let injected = self.codec.encode(&redo)?;
        th.text.truncate(boundary);
        th.text.push_str(&redo);
        // The detector sees the text as the thread now holds it, injected opener included.
        th.stop.restart(boundary);
        if th.stop.push(&redo).is_some() {
            return Err("substitution wrote a join marker".into());
        }
        // Simplest consistent record: the sampled tokens up to the boundary stay; everything the
        // runtime wrote is marked as injected.
        let mut text_len = th.segment_start_text;
        let mut kept = 0;
        for &tok in &th.out_tokens {
            let next = text_len + self.codec.piece(tok).len();
            if next > boundary {
                break;
            }
            text_len = next;
            kept += 1;
        }
        th.out_tokens.truncate(kept);
        th.out_logprobs.truncate(kept);
        th.out_sampled.truncate(kept);
        for &tok in &injected {
            th.out_tokens.push(tok);
            th.out_logprobs.push(0.0);
            th.out_sampled.push(false);
        }
        if injected.is_empty() {
            return Err("substitution produced no tokens".into());
        }
        th.pending = injected;
        th.pending_sampled = None;
        Ok(())
    }

    fn end_segment<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let th = &self.threads[t];
        let may_spawn =
            self.config.mode == Mode::Apr && (th.role == Role::Parent || self.config.nested);
        if may_spawn && ends_with_spawn(&th.text) {
            self.spawn(t, decoder, progress);
        } else {
            self.end_segment_with(t, Finish::Eos, decoder, progress);
        }
    }

    fn take_segment(&mut self, t: usize, finish: Finish) -> (Vec<usize>, Segment) {
        let th = &mut self.threads[t];
        let key = segment_key(&th.tree_key, th.segment_count);
        let prompt_tokens_len = th.segment_prompt_tokens.unwrap_or(th.tokens.len());
        let prompt_tokens = th.tokens[..prompt_tokens_len.min(th.tokens.len())].to_vec();
        let seg = Segment {
            role: th.role,
            round: if th.role == Role::Parent {
                th.segment_count
            } else {
                th.round
            },
            index: th.index,
            node: th.node.as_ref().map(ToString::to_string),
            prompt: std::mem::take(&mut th.segment_prompt),
            output: th.text[th.segment_start_text.min(th.text.len())..].to_owned(),
            finish,
            prompt_tokens,
            tokens: std::mem::take(&mut th.out_tokens),
            logprobs: std::mem::take(&mut th.out_logprobs),
            sampled: std::mem::take(&mut th.out_sampled),
            reused_prefix: std::mem::take(&mut th.reused_prefix),
        };
        th.segment_count += 1;
        th.segment_prompt_tokens = None;
        (key, seg)
    }

    /// Ends a thread for good (EOS without spawn, context limit).
    fn end_segment_with<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        finish: Finish,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let seg = self.take_segment(t, finish);
        let p = self.threads[t].problem;
        let seg_len = seg.1.len();
        self.problems[p].segments.push(seg);
        self.retire(t, decoder);
        let th = &self.threads[t];
        match (th.role, th.parent) {
            (Role::Child, Some(parent)) => {
                let round = th.round;
                let processed = th.processed;
                self.threads[parent].processed += processed;
                if let Some(lens) = self.problems[p].round_children.get_mut(round) {
                    lens.push(seg_len);
                }
                self.threads[parent].children_done += 1;
                let parent_th = &self.threads[parent];
                if parent_th.children_done == parent_th.children.len() {
                    self.join(parent, decoder, progress);
                }
            }
            _ => {
                if finish == Finish::ContextLimit {
                    self.fail(
                        p,
                        "root thread reached the context limit".into(),
                        decoder,
                        progress,
                    );
                } else {
                    self.complete(p, decoder, progress);
                }
            }
        }
    }

    fn retire<D: BatchedDecoder + ?Sized>(&mut self, t: usize, decoder: &mut D) {
        let th = &mut self.threads[t];
        if th.state == ThreadState::Done {
            return;
        }
        th.state = ThreadState::Done;
        th.pending.clear();
        if let Some(slot) = th.slot.take() {
            decoder.release(slot);
            self.owners[slot] = None;
            self.free_slots.push(slot);
        }
        self.problems[th.problem].live_threads -= 1;
    }

    fn spawn<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let p = self.threads[t].problem;
        let text = self.threads[t].text.clone();
        let split = match split_spawn(&text) {
            Ok(s) => s,
            Err(e) => {
                return self.fail(p, format!("malformed spawn block: {e}"), decoder, progress)
            }
        };
        let th = &self.threads[t];
        if th.spawn_rounds >= self.config.max_spawn_rounds {
            return self.fail(
                p,
                format!(
                    "spawn round budget ({}) exceeded",
                    self.config.max_spawn_rounds
                ),
                decoder,
                progress,
            );
        }
        if split.block.children.len() > self.config.max_children {
            return self.fail(
                p,
                format!(
                    "{} children exceed the budget of {}",
                    split.block.children.len(),
                    self.config.max_children
                ),
                decoder,
                progress,
            );
        }
        let mut prompts = Vec::with_capacity(split.block.children.len());
        for node in &split.block.children {
            match self.task.child_prompt(&text, node) {
                Ok(prompt) => prompts.push((node.clone(), prompt)),
                Err(e) => return self.fail(p, format!("spawn: {e}"), decoder, progress),
            }
        }
        let seg = self.take_segment(t, Finish::Spawn);
        self.problems[p].segments.push(seg);
        let round = self.problems[p].round_children.len();
        self.problems[p].round_children.push(Vec::new());
        let child_prefix = match self.config.conditioning.token_budget {
            Some(b) => format!("Token Budget: {b} "),
            None => String::new(),
        };
        let mut children = Vec::with_capacity(prompts.len());
        for (index, (node, prompt)) in prompts.into_iter().enumerate() {
            let c = self.new_thread(
                p,
                Role::Child,
                Some(t),
                round,
                index,
                Some(node),
                format!("{child_prefix}{prompt}"),
            );
            children.push(c);
        }
        let share = self.threads[t]
            .allowance
            .saturating_sub(self.threads[t].processed)
            / children.len().max(1);
        for &c in &children {
            self.threads[c].allowance = share;
        }
        let th = &mut self.threads[t];
        th.spawn_rounds += 1;
        th.state = ThreadState::Waiting;
        th.pending.clear();
        th.children = children.clone();
        th.children_done = 0;
        self.ready.extend(children);
    }

    /// All children of `t` ended: rewrite its context and resume it.
    fn join<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let p = self.threads[t].problem;
        let entries: Vec<JoinEntry> = self.threads[t]
            .children
            .iter()
            .map(|&c| {
                let child = &self.threads[c];
                let output = &child.text;
                JoinEntry {
                    node: child.node.clone().expect("a child thread explores a node"),
                    result: self.task.join_message(output),
                }
            })
            .collect();
        let text = self.threads[t].text.clone();
        let split = match split_spawn(&text) {
            Ok(s) => s,
            Err(e) => return self.fail(p, format!("join: {e}"), decoder, progress),
        };
        let block = JoinBlock {
            level: split.block.level,
            entries,
        };
        let new_text = join_context(split.before, &block);
        let before_len = split.before.len();
        let th = &mut self.threads[t];
        th.text = new_text.clone();
        th.segment_prompt = new_text;
        // Keep the context up to the last token boundary inside the pre-spawn text: in the
        // slot's KV cache if the parent kept its slot, else replayed into a new one.
        let keep = th
            .text_ends
            .iter()
            .take_while(|&&e| e <= before_len)
            .count()
            .max(1)
            .min(th.tokens.len());
        if keep == 0 {
            return self.fail(
                p,
                "join: the parent holds no context".into(),
                decoder,
                progress,
            );
        }
        let boundary = th.text_ends[keep - 1];
        th.tokens.truncate(keep);
        th.text_ends.truncate(keep);
        th.reused_prefix = keep;
        let join_tokens = match self.codec.encode(&th.text[boundary..]) {
            Ok(tokens) if !tokens.is_empty() => tokens,
            Ok(_) => return self.fail(p, "join: empty join block".into(), decoder, progress),
            Err(e) => return self.fail(p, format!("join: {e}"), decoder, progress),
        };
        th.pending_sampled = None;
        th.segment_start_text = th.text.len();
        th.stop.restart(th.segment_start_text);
        if keep + join_tokens.len() + 1 > self.context {
            // No room to write anything after the join block: the call ends where it starts.
            th.tokens.extend(join_tokens);
            th.segment_prompt_tokens = Some(th.tokens.len());
            return self.end_segment_with(t, Finish::ContextLimit, decoder, progress);
        }
        match th.slot {
            Some(slot) => {
                if let Err(e) = decoder.truncate(slot, keep) {
                    return self.fail(p, format!("join: {e}"), decoder, progress);
                }
                th.pending = join_tokens;
                th.state = ThreadState::Running;
            }
            None => {
                // The slot was lent to children: replay the kept context in the next free one.
                let mut pending = std::mem::take(&mut th.tokens);
                th.text_ends.clear();
                pending.extend(join_tokens);
                th.pending = pending;
                th.replayed = keep;
                th.state = ThreadState::Queued;
                self.ready.push_front(t);
            }
        }
    }

    fn complete<D: BatchedDecoder + ?Sized>(
        &mut self,
        p: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        self.close(p, None, decoder, progress);
    }

    fn fail<D: BatchedDecoder + ?Sized>(
        &mut self,
        p: usize,
        reason: String,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        self.close(p, Some(reason), decoder, progress);
    }

    fn close<D: BatchedDecoder + ?Sized>(
        &mut self,
        p: usize,
        failure: Option<String>,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        if self.problems[p].done {
            return;
        }
        // Cancel every live thread of the problem.
        let live: Vec<usize> = self.problems[p]
            .threads
            .iter()
            .copied()
            .filter(|&t| self.threads[t].state != ThreadState::Done)
            .collect();
        for t in live {
            let seg = self.take_segment(t, Finish::Cancelled);
            if !seg.1.tokens.is_empty() || self.threads[t].role == Role::Child {
                self.problems[p].segments.push(seg);
            }
            self.retire(t, decoder);
        }
        // Everything worth keeping is in the segments now: free the threads' buffers, so that
        // memory follows the problems in flight, not the problems run.
        for &t in &self.problems[p].threads {
            let th = &mut self.threads[t];
            th.text = String::new();
            th.tokens = Vec::new();
            th.text_ends = Vec::new();
        }
        let prob = &mut self.problems[p];
        prob.failure = failure;
        prob.done = true;
        self.in_flight.retain(|&q| q != p);
        self.finished += 1;
        progress(self.finished);
    }

    fn check_timeouts<D: BatchedDecoder + ?Sized>(
        &mut self,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let Some(limit) = self.config.timeout else {
            return;
        };
        let expired: Vec<usize> = self
            .in_flight
            .iter()
            .copied()
            .filter(|&p| {
                let prob = &self.problems[p];
                !prob.done && prob.started.is_some_and(|s| s.elapsed() > limit)
            })
            .collect();
        for p in expired {
            self.fail(p, "wall-clock timeout".into(), decoder, progress);
        }
    }
}

fn finish_problem<T: Task>(task: &T, mut p: ProblemState<T::Problem>) -> ProblemResult {
    let latency = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    p.segments.sort_by(|a, b| a.0.cmp(&b.0));
    let segments: Vec<Segment> = p.segments.into_iter().map(|(_, s)| s).collect();
    let root_text = segments
        .iter()
        .rev()
        .find(|s| s.role == Role::Parent && s.finish == Finish::Eos)
        .map(|s| format!("{}{}", s.prompt, s.output));
    let answer = if p.failure.is_none() {
        root_text.as_deref().and_then(|t| task.final_answer(t))
    } else {
        None
    };
    let reward = task.reward(&p.job.problem, answer.as_deref());
    let metrics = metrics(
        &segments,
        &p.round_children,
        p.prefilled,
        p.generated,
        latency,
    );
    ProblemResult {
        id: p.job.id,
        prompt: p.prompt,
        segments,
        answer,
        reward,
        failure: p.failure,
        metrics,
    }
}

fn metrics(
    segments: &[Segment],
    rounds: &[Vec<usize>],
    prefilled: usize,
    generated: usize,
    latency: f64,
) -> Metrics {
    let mut m = Metrics {
        prefilled_tokens: prefilled,
        generated_tokens: generated,
        latency_s: latency,
        spawn_rounds: rounds.len(),
        ..Metrics::default()
    };
    for s in segments {
        let len = s.len() + 1; // EOS
        m.total_tokens += len - s.reused_prefix.min(len);
        m.longest_thread = m.longest_thread.max(s.len());
        if s.role == Role::Child {
            m.children += 1;
        } else {
            // Parent calls run in sequence; a resumed call only adds what follows the prefix.
            m.sequential_tokens += len - s.reused_prefix.min(len);
        }
    }
    m.sequential_tokens += rounds
        .iter()
        .map(|r| r.iter().copied().max().unwrap_or(0) + 1)
        .sum::<usize>();
    m
}
