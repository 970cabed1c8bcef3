//! The engine thread: every sequence of every request decoded together in batched steps.
//!
//! A sequence waits in a queue until a slot is free, then prefills its prompt and decodes one
//! token a step beside every other live sequence (continuous batching: a finished sequence's
//! slot goes to the next one at once). A free slot keeps the tokens of the last sequence it held;
//! a new prompt that starts with them keeps that KV prefix and prefills only the rest (the
//! longest match wins, otherwise the least recently used slot is taken). Memory is bounded by the
//! slots. A client that goes away frees its slot at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use apr_core::{BatchedDecoder, Sampling, StepInput, StopDetector, TextCodec};
use tokio::sync::mpsc::UnboundedSender;

/// Why a sequence ended, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens`, or the context.
    Length,
}

impl FinishReason {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine thread reports about one sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text (held back while it could still be the start of a stop string), with the tokens
    /// sampled since the last event and their log-probabilities.
    Text {
        /// The text.
        text: String,
        /// Tokens and log-probabilities (at τ = 1) behind it.
        tokens: Vec<(u32, f32)>,
    },
    /// The end.
    Done {
        /// Why.
        reason: FinishReason,
        /// The stop string that matched, if one did.
        stop: Option<String>,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The engine failed this sequence.
    Error(String),
}

/// One sequence to generate.
pub struct Job {
    /// Which choice of its request this is (events carry it back).
    pub choice: usize,
    /// Prompt tokens, BOS first.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to sample.
    pub sampling: Sampling,
    /// The sequence's seed: its draw at position `p` is `uniform_at(seed, p)`.
    pub seed: u64,
    /// Stop strings (not part of the returned text).
    pub stops: Vec<String>,
    /// Where events go; a closed receiver cancels the sequence.
    pub events: UnboundedSender<(usize, Event)>,
}

/// Counters the `/metrics` route reports.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sequences finished (any reason).
    pub sequences: AtomicU64,
    /// Tokens sampled.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens prefilled into slots.
    pub prefilled_tokens: AtomicU64,
    /// Prompt tokens served from the prefix cache instead.
    pub reused_tokens: AtomicU64,
    /// Sequences cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Batched engine steps.
    pub steps: AtomicU64,
    /// Slots busy now.
    pub busy_slots: AtomicU64,
    /// Sequences waiting for a slot now.
    pub waiting: AtomicU64,
}

struct Live {
    job: Job,
    /// Tokens to feed at the next step.
    pending: Vec<u32>,
    generated: usize,
    /// Generated text, and how much of it has been sent.
    text: String,
    sent: usize,
    unsent_tokens: Vec<(u32, f32)>,
    stop: StopDetector,
    longest_stop: usize,
}

struct Slot {
    /// Tokens in the slot's KV state.
    held: Vec<u32>,
    live: Option<Live>,
    last_used: u64,
}

/// Runs the engine until the job channel closes.
pub fn run(
    decoder: &mut dyn BatchedDecoder,
    codec: &dyn TextCodec,
    jobs: Receiver<Job>,
    counters: Arc<Counters>,
) {
    let mut slots: Vec<Slot> = (0..decoder.slots())
        .map(|_| Slot {
            held: Vec::new(),
            live: None,
            last_used: 0,
        })
        .collect();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut clock = 0u64;
    let context = decoder.context_limit();
    loop {
        // Block only when there is nothing to do.
        let idle = waiting.is_empty() && slots.iter().all(|s| s.live.is_none());
        if idle {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if waiting.is_empty() && slots.iter().all(|s| s.live.is_none()) {
                        return;
                    }
                    break;
                }
            }
        }
        clock += 1;
        admit(decoder, &mut slots, &mut waiting, clock, &counters);
        counters
            .waiting
            .store(waiting.len() as u64, Ordering::Relaxed);
        let busy: Vec<usize> = (0..slots.len())
            .filter(|&s| slots[s].live.is_some())
            .collect();
        counters
            .busy_slots
            .store(busy.len() as u64, Ordering::Relaxed);
        if busy.is_empty() {
            continue;
        }
        // Prefill rows and decode rows in separate passes, as the runtime does.
        let (prefill, decode): (Vec<usize>, Vec<usize>) = busy
            .into_iter()
            .partition(|&s| slots[s].live.as_ref().is_some_and(|l| l.pending.len() > 1));
        for group in [prefill, decode] {
            if group.is_empty() {
                continue;
            }
            step(
                decoder, codec, &mut slots, &group, context, clock, &counters,
            );
        }
        let busy = slots.iter().filter(|s| s.live.is_some()).count();
        counters.busy_slots.store(busy as u64, Ordering::Relaxed);
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Gives waiting jobs free slots, preferring the slot whose held tokens share the longest prefix
/// with the prompt.
fn admit(
    decoder: &mut dyn BatchedDecoder,
    slots: &mut [Slot],
    waiting: &mut VecDeque<Job>,
    clock: u64,
    counters: &Counters,
) {
    while let Some(job) = waiting.front() {
        if job.events.is_closed() {
            waiting.pop_front();
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let free = (0..slots.len()).filter(|&s| slots[s].live.is_none());
        let best = free
            .map(|s| (common_prefix(&slots[s].held, &job.prompt), s))
            .max_by_key(|&(lcp, s)| (lcp, std::cmp::Reverse(slots[s].last_used)));
        let Some((lcp, s)) = best else { return };
        let job = waiting.pop_front().expect("a job is waiting");
        // At least one token is fed, so that the step returns the next token's distribution.
        let keep = lcp.min(job.prompt.len().saturating_sub(1));
        let slot = &mut slots[s];
        if decoder.truncate(s, keep).is_err() {
            decoder.release(s);
            slot.held.clear();
        } else {
            slot.held.truncate(keep);
        }
        let keep = slot.held.len();
        counters
            .reused_tokens
            .fetch_add(keep as u64, Ordering::Relaxed);
        counters
            .prefilled_tokens
            .fetch_add((job.prompt.len() - keep) as u64, Ordering::Relaxed);
        let longest_stop = job.stops.iter().map(String::len).max().unwrap_or(0);
        slot.live = Some(Live {
            pending: job.prompt[keep..].to_vec(),
            stop: StopDetector::new(&job.stops),
            longest_stop,
            job,
            generated: 0,
            text: String::new(),
            sent: 0,
            unsent_tokens: Vec::new(),
        });
        slot.last_used = clock;
    }
}

fn step(
    decoder: &mut dyn BatchedDecoder,
    codec: &dyn TextCodec,
    slots: &mut [Slot],
    group: &[usize],
    context: usize,
    clock: u64,
    counters: &Counters,
) {
    let inputs: Vec<StepInput> = group
        .iter()
        .map(|&s| {
            let live = slots[s].live.as_ref().expect("busy slots are live");
            StepInput {
                slot: s,
                tokens: &live.pending,
                sampling: live.job.sampling,
                seed: live.job.seed,
            }
        })
        .collect();
    counters.steps.fetch_add(1, Ordering::Relaxed);
    let sampled = match decoder.step(&inputs) {
        Ok(sampled) => sampled,
        Err(e) => {
            for &s in group {
                if let Some(live) = slots[s].live.take() {
                    let _ = live
                        .job
                        .events
                        .send((live.job.choice, Event::Error(e.to_string())));
                }
                decoder.release(s);
                slots[s].held.clear();
            }
            return;
        }
    };
    for (&s, sample) in group.iter().zip(sampled) {
        let slot = &mut slots[s];
        slot.last_used = clock;
        let Some(live) = slot.live.as_mut() else {
            continue;
        };
        slot.held.extend(std::mem::take(&mut live.pending));
        if live.job.events.is_closed() {
            slot.live = None;
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let end = if sample.token == codec.eos() {
            Some((FinishReason::Stop, None))
        } else {
            live.generated += 1;
            let piece = codec.piece(sample.token);
            live.text.push_str(piece);
            live.unsent_tokens.push((sample.token, sample.logprob));
            match live.stop.push(piece) {
                Some(hit) => {
                    // The text ends where the stop string starts.
                    live.text.truncate(hit.start);
                    Some((FinishReason::Stop, Some(live.job.stops[hit.marker].clone())))
                }
                None if live.generated >= live.job.max_tokens => Some((FinishReason::Length, None)),
                None if slot.held.len() + 1 >= context => Some((FinishReason::Length, None)),
                None => {
                    live.pending = vec![sample.token];
                    None
                }
            }
        };
        let live = slot.live.as_mut().expect("still live");
        // Send what can no longer turn into a stop string.
        let safe = match end {
            Some(_) => live.text.len(),
            None => floor_char_boundary(
                &live.text,
                live.text
                    .len()
                    .saturating_sub(live.longest_stop.saturating_sub(1)),
            ),
        };
        if safe > live.sent || (end.is_some() && !live.unsent_tokens.is_empty()) {
            let text = live.text[live.sent.min(safe)..safe].to_owned();
            live.sent = safe;
            let tokens = std::mem::take(&mut live.unsent_tokens);
            let _ = live
                .job
                .events
                .send((live.job.choice, Event::Text { text, tokens }));
        }
        if let Some((reason, stop)) = end {
            let completion_tokens = live.generated;
            let _ = live.job.events.send((
                live.job.choice,
                Event::Done {
                    reason,
                    stop,
                    completion_tokens,
                },
            ));
            slot.live = None;
            counters.sequences.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
