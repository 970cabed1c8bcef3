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
//!
//! * `outcome`: the records a run returns;
//! * `thread`: a thread's tree state, slot context and segment draft;
//! * `tree`: spawn, join and substitution, the protocol's moves;
//! * this module: admission, batched steps, budgets, cancellation.

mod outcome;
mod thread;
mod tree;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::decoder::{BatchedDecoder, Horizon, Sampling, SlotId, StepInput, TextCodec};
use crate::grammar::{Conditioning, JOIN_OPEN};
pub use crate::mode::Mode;
use crate::task::Task;

pub use outcome::{Failure, Finish, Metrics, ProblemResult, Role, Segment};
use thread::{Place, Thread, ThreadState};

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

struct ProblemState<P> {
    job: Job<P>,
    prompt: String,
    root: Option<usize>,
    started: Option<Instant>,
    /// Segments as they ended, each with its key (`thread::segment_key`).
    segments: Vec<(Vec<usize>, Segment)>,
    failure: Option<Failure>,
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
        free_slots: (0..decoder.slots()).map(Reverse).collect(),
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
    /// Free slots, lowest first: the held ones stay packed at the bottom, so a decoder whose
    /// step covers slots `0..rows` (the captured GPU step) pads few idle rows.
    free_slots: BinaryHeap<Reverse<SlotId>>,
    /// The thread holding each slot: every step looks only at these, never at all threads.
    owners: Vec<Option<usize>>,
    /// Problems admitted and not yet done.
    in_flight: Vec<usize>,
    next_problem: usize,
    finished: usize,
    /// Threads waiting for a slot, children and resumes first.
    ready: VecDeque<usize>,
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
                    th.state == ThreadState::Running && !th.ctx.pending.is_empty()
                })
                .collect();
            if running.is_empty() {
                // Admission did all it could and nothing runs: no progress is possible (e.g. a
                // decoder without slots). Fail what is left rather than spin.
                for p in 0..total {
                    if !self.problems[p].done {
                        self.fail(p, Failure::Stalled, decoder, progress);
                    }
                }
                continue;
            }
            // Prefill rows (several tokens) and decode rows (one token) go in separate passes so
            // that one long prompt does not pad every decode row.
            let (prefill, decode): (Vec<usize>, Vec<usize>) = running
                .into_iter()
                .partition(|&t| self.threads[t].ctx.pending.len() > 1);
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
                    tokens: &th.ctx.pending,
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
                                || (th.ctx.pending_sampled.is_some()
                                    && th.ctx.pending == [chunk[j - 1].token]));
                        if !continues {
                            break;
                        }
                        self.accept(t, s.token, s.logprob, decoder, progress);
                    }
                }
                // A failed call fails its problem, never the whole run.
                Err(e) => {
                    if !self.problems[p].done {
                        self.fail(p, Failure::Decoder(e.to_string()), decoder, progress);
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
        let held = th.ctx.tokens.len() + th.ctx.pending.len();
        let processed =
            th.processed + th.ctx.pending.len() - th.ctx.replayed.min(th.ctx.pending.len());
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
            let Reverse(slot) = self.free_slots.pop().expect("a slot is free");
            self.start_in_slot(t, slot, decoder, progress);
        }
        while self.next_problem < self.problems.len() && !self.free_slots.is_empty() {
            let p = self.next_problem;
            self.next_problem += 1;
            self.problems[p].started = Some(Instant::now());
            self.in_flight.push(p);
            let prompt = self.problems[p].prompt.clone();
            let t = self.new_thread(p, Place::root(), prompt);
            self.problems[p].root = Some(t);
            let Reverse(slot) = self.free_slots.pop().expect("a slot is free");
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
                self.free_slots.push(Reverse(slot));
                true
            }
            None => false,
        }
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
        if !th.ctx.pending.is_empty() {
            return; // a resumed parent: `join` queued its replay and join block
        }
        th.ctx.text = th.draft.prompt.clone();
        th.ctx.tokens.clear();
        th.ctx.text_ends.clear();
        match self.codec.encode(&th.ctx.text) {
            Ok(tokens) => {
                let mut pending = vec![self.codec.bos()];
                pending.extend(tokens);
                th.ctx.pending = pending;
                th.ctx.pending_sampled = None;
                th.draft.start_text = th.ctx.text.len();
                th.ctx.stop.restart(th.draft.start_text);
                if th.ctx.pending.len() + 1 > self.context {
                    let p = th.problem;
                    self.fail(p, Failure::PromptTooLong, decoder, progress);
                }
            }
            Err(e) => {
                let p = th.problem;
                self.fail(p, Failure::PromptEncoding(e.to_string()), decoder, progress);
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
            let pending = std::mem::take(&mut th.ctx.pending);
            let mut end = th.ctx.text_ends.last().copied().unwrap_or(0);
            // Tokens the runtime supplied (prompt, join block, substitution) count as prefilled;
            // a single pending sampled token is the previous step's output.
            let supplied = th.ctx.pending_sampled.take().is_none();
            if th.draft.prompt_tokens.is_none() {
                th.draft.prompt_tokens = Some(th.ctx.tokens.len() + pending.len());
            }
            for (i, &tok) in pending.iter().enumerate() {
                if !(th.ctx.tokens.is_empty() && i == 0 && tok == self.codec.bos()) {
                    end += self.codec.piece(tok).len();
                }
                th.ctx.tokens.push(tok);
                th.ctx.text_ends.push(end);
            }
            let new_tokens = pending.len() - std::mem::take(&mut th.ctx.replayed);
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
        th.ctx.text.push_str(&piece);
        th.draft.push(token, Some(logprob));
        th.ctx.pending = vec![token];
        th.ctx.pending_sampled = Some(logprob);
        if let Some(hit) = th.ctx.stop.push(&piece) {
            // The model tried to write the join block itself: cut it and substitute the spawn
            // opener (reference `decode_trace`), then let it continue. The detector holds
            // offsets into `text`, so the cut is exact however many substitutions came before.
            let cut = hit.start;
            if let Err(reason) = self.substitute(t, cut, decoder) {
                self.fail(p, Failure::Substitution(reason), decoder, progress);
                return;
            }
        }
        let th = &self.threads[t];
        if th.ctx.tokens.len() + th.ctx.pending.len() >= self.context {
            self.end_segment_with(t, Finish::ContextLimit, decoder, progress);
            return;
        }
        if th.processed + 1 > th.allowance {
            match th.role {
                Role::Child => self.end_segment_with(t, Finish::Budget, decoder, progress),
                Role::Parent => self.fail(p, Failure::Budget, decoder, progress),
            }
        }
    }

    fn retire<D: BatchedDecoder + ?Sized>(&mut self, t: usize, decoder: &mut D) {
        let th = &mut self.threads[t];
        if th.state == ThreadState::Done {
            return;
        }
        th.state = ThreadState::Done;
        th.ctx.pending.clear();
        if let Some(slot) = th.slot.take() {
            decoder.release(slot);
            self.owners[slot] = None;
            self.free_slots.push(Reverse(slot));
        }
        self.problems[th.problem].live_threads -= 1;
    }

    fn fail<D: BatchedDecoder + ?Sized>(
        &mut self,
        p: usize,
        reason: Failure,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        self.close(p, Some(reason), decoder, progress);
    }

    fn close<D: BatchedDecoder + ?Sized>(
        &mut self,
        p: usize,
        failure: Option<Failure>,
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
            let seg = self.threads[t].take_segment(Finish::Cancelled);
            if !seg.1.tokens.is_empty() || self.threads[t].role == Role::Child {
                self.problems[p].segments.push(seg);
            }
            self.retire(t, decoder);
        }
        // Everything worth keeping is in the segments now: free the threads' buffers, so that
        // memory follows the problems in flight, not the problems run.
        for &t in &self.problems[p].threads {
            self.threads[t].ctx.clear();
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
            self.fail(p, Failure::Timeout, decoder, progress);
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
    let metrics = outcome::metrics(
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
