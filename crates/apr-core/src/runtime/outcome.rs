//! What a run returns: one [`ProblemResult`] per problem, its [`Segment`]s (one per LM call) and
//! its [`Metrics`], counted as the paper counts them.

use serde::{Deserialize, Serialize};

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
    /// Why the problem failed, if it did (malformed spawn, budget, timeout, context, …);
    /// written to records as its message.
    pub failure: Option<Failure>,
    /// Metrics.
    pub metrics: Metrics,
}

impl ProblemResult {
    /// Whether the verified answer is correct.
    pub fn correct(&self) -> bool {
        self.reward > 0.0
    }

    /// The segments of threads of `role`, in tree order.
    pub fn segments_of(&self, role: Role) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.role == role)
    }

    /// Each call of `role`'s threads as the model saw and wrote it (prompt, then output): the
    /// form of a solver trace's calls.
    pub fn calls(&self, role: Role) -> Vec<String> {
        self.segments_of(role)
            .map(|s| format!("{}{}", s.prompt, s.output))
            .collect()
    }
}

/// Why a problem failed. Records hold the message ([`std::fmt::Display`]), and a message reads
/// back as its variant ([`Failure::Other`] for one of no known form).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Failure {
    /// Admission could do nothing and nothing ran (a decoder without slots).
    #[error("runtime stalled: no slot available")]
    Stalled,
    /// The root prompt does not fit the per-thread context.
    #[error("prompt exceeds the context")]
    PromptTooLong,
    /// The codec refused a prompt.
    #[error("prompt cannot be tokenized: {0}")]
    PromptEncoding(String),
    /// The decoder failed a step of the problem.
    #[error("decoder error: {0}")]
    Decoder(String),
    /// The runtime could not put `<Calling Sub Searches>` in place of a join block the model
    /// wrote itself.
    #[error("{0}")]
    Substitution(String),
    /// The root thread reached the per-thread context.
    #[error("root thread reached the context limit")]
    RootContextLimit,
    /// The root thread used up the problem's total token budget.
    #[error("total token budget exhausted")]
    Budget,
    /// A spawn block that does not parse.
    #[error("malformed spawn block: {0}")]
    MalformedSpawn(String),
    /// More spawn rounds than the budget allows (the budget).
    #[error("spawn round budget ({0}) exceeded")]
    SpawnRounds(usize),
    /// A spawn naming more children than allowed.
    #[error("{named} children exceed the budget of {limit}")]
    Children {
        /// Children the block names.
        named: usize,
        /// The budget.
        limit: usize,
    },
    /// The task refused a child's prompt.
    #[error("spawn: {0}")]
    ChildPrompt(String),
    /// The join block could not be built or prefilled.
    #[error("join: {0}")]
    Join(String),
    /// The problem ran past its wall-clock limit.
    #[error("wall-clock timeout")]
    Timeout,
    /// A message of none of these forms (read back from a record).
    #[error("{0}")]
    Other(String),
}

impl From<Failure> for String {
    fn from(failure: Failure) -> String {
        failure.to_string()
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        let fixed = [
            Failure::Stalled,
            Failure::PromptTooLong,
            Failure::RootContextLimit,
            Failure::Budget,
            Failure::Timeout,
        ];
        if let Some(f) = fixed.into_iter().find(|f| f.to_string() == message) {
            return f;
        }
        type Variant = fn(String) -> Failure;
        let prefixed: [(&str, Variant); 5] = [
            ("prompt cannot be tokenized: ", Failure::PromptEncoding),
            ("decoder error: ", Failure::Decoder),
            ("malformed spawn block: ", Failure::MalformedSpawn),
            ("spawn: ", Failure::ChildPrompt),
            ("join: ", Failure::Join),
        ];
        for (prefix, variant) in prefixed {
            if let Some(rest) = message.strip_prefix(prefix) {
                return variant(rest.to_owned());
            }
        }
        let rounds = message
            .strip_prefix("spawn round budget (")
            .and_then(|r| r.strip_suffix(") exceeded"))
            .and_then(|n| n.parse().ok());
        if let Some(n) = rounds {
            return Failure::SpawnRounds(n);
        }
        let children = message
            .split_once(" children exceed the budget of ")
            .and_then(|(n, m)| Some((n.parse().ok()?, m.parse().ok()?)));
        if let Some((named, limit)) = children {
            return Failure::Children { named, limit };
        }
        Failure::Other(message)
    }
}

/// The paper's metrics (spec §6.2) of a problem's segments; `rounds` holds the lengths of each
/// spawn round's children.
pub(super) fn metrics(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_back_from_their_messages() {
        let all = [
            Failure::Stalled,
            Failure::PromptTooLong,
            Failure::PromptEncoding("no token for 'é'".into()),
            Failure::Decoder("slot 3 is out of range".into()),
            Failure::RootContextLimit,
            Failure::Budget,
            Failure::MalformedSpawn("no closing tag".into()),
            Failure::SpawnRounds(8),
            Failure::Children {
                named: 17,
                limit: 16,
            },
            Failure::ChildPrompt("unknown node".into()),
            Failure::Join("empty join block".into()),
            Failure::Timeout,
            Failure::Other("something new".into()),
        ];
        for f in all {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, serde_json::to_string(&f.to_string()).unwrap());
            assert_eq!(serde_json::from_str::<Failure>(&json).unwrap(), f, "{json}");
        }
        // A substitution failure is its message alone: it reads back with the same message.
        let sub = Failure::Substitution("substitution produced no tokens".into());
        let back = Failure::from(String::from(sub.clone()));
        assert_eq!(back.to_string(), sub.to_string());
        assert_eq!(
            Failure::from("total token budget exhausted".to_string()),
            Failure::Budget
        );
    }

    fn segment(role: Role, prompt: usize, output: usize, reused_prefix: usize) -> Segment {
        Segment {
            role,
            round: 0,
            index: 0,
            node: None,
            prompt: String::new(),
            output: String::new(),
            finish: Finish::Eos,
            prompt_tokens: vec![1; prompt],
            tokens: vec![2; output],
            logprobs: vec![0.0; output],
            sampled: vec![true; output],
            reused_prefix,
        }
    }

    #[test]
    fn metrics_count_a_reused_prefix_once_and_the_longest_child_per_round() {
        // Parent call of 10 + 20 tokens, two children (5 + 10, 5 + 3), then a resumed call that
        // reuses 25 of its 40 + 5 tokens.
        let segments = [
            segment(Role::Parent, 10, 20, 0),
            segment(Role::Child, 5, 10, 0),
            segment(Role::Child, 5, 3, 0),
            segment(Role::Parent, 40, 5, 25),
        ];
        let m = metrics(&segments, &[vec![15, 8]], 60, 38, 1.5);
        assert_eq!(m.total_tokens, 31 + 16 + 9 + (46 - 25));
        assert_eq!(m.sequential_tokens, 31 + (46 - 25) + 16);
        assert_eq!(m.longest_thread, 45);
        assert_eq!((m.children, m.spawn_rounds), (2, 1));
        assert_eq!((m.prefilled_tokens, m.generated_tokens), (60, 38));
        assert_eq!(m.latency_s, 1.5);
    }
}
