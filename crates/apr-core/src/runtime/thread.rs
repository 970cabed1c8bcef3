//! One thread of a problem's tree, in three parts: its place in the tree (who spawned it, its
//! budget, its children), its [`Context`] (the tokens in its slot and what is queued for the next
//! step), and its [`Draft`] (the segment being written, which becomes a [`Segment`] record).

use crate::decoder::SlotId;
use crate::grammar::{NodeId, JOIN_OPEN};
use crate::stop::StopDetector;

use super::outcome::{Finish, Role, Segment};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ThreadState {
    /// Needs a slot (to start, or to resume after eviction).
    Queued,
    /// Holds a slot and decodes.
    Running,
    /// Holds (or has lost) its slot while its children run.
    Waiting,
    Done,
}

/// A thread's place in its problem's tree and its share of the budget.
pub(super) struct Thread {
    pub(super) problem: usize,
    pub(super) role: Role,
    pub(super) parent: Option<usize>,
    pub(super) round: usize,
    pub(super) index: usize,
    pub(super) node: Option<NodeId>,
    /// Where the thread sits in its problem's tree: the parent's key, then `2·call + 1` and the
    /// child's index (the root's is empty). It orders segments and seeds sampling, so both depend
    /// only on the tree, never on which thread happened to be admitted first.
    pub(super) tree_key: Vec<usize>,
    pub(super) seed: u64,
    pub(super) state: ThreadState,
    pub(super) slot: Option<SlotId>,
    /// Tokens this thread may process, its children's included.
    pub(super) allowance: usize,
    /// Tokens it has processed so far, those of its finished children included.
    pub(super) processed: usize,
    /// Children of the current spawn round, and how many have ended.
    pub(super) children: Vec<usize>,
    pub(super) children_done: usize,
    pub(super) spawn_rounds: usize,
    /// Segments recorded so far (parent calls, or 1 for a child once it ends).
    pub(super) segment_count: usize,
    pub(super) ctx: Context,
    pub(super) draft: Draft,
}

/// Who a thread is in its problem's tree.
pub(super) struct Place {
    pub(super) role: Role,
    pub(super) parent: Option<usize>,
    /// A child's spawn round.
    pub(super) round: usize,
    /// A child's index in its spawn block.
    pub(super) index: usize,
    /// The node a child explores.
    pub(super) node: Option<NodeId>,
}

impl Place {
    /// The root thread.
    pub(super) fn root() -> Place {
        Place {
            role: Role::Parent,
            parent: None,
            round: 0,
            index: 0,
            node: None,
        }
    }

    /// Child `index` of thread `parent`'s spawn round `round`, exploring `node`.
    pub(super) fn child(parent: usize, round: usize, index: usize, node: NodeId) -> Place {
        Place {
            role: Role::Child,
            parent: Some(parent),
            round,
            index,
            node: Some(node),
        }
    }
}

impl Thread {
    /// A queued thread of `problem` at `place` with an empty context, to start from `prompt`.
    pub(super) fn new(
        problem: usize,
        place: Place,
        tree_key: Vec<usize>,
        problem_seed: u64,
        allowance: usize,
        prompt: String,
    ) -> Thread {
        Thread {
            problem,
            role: place.role,
            parent: place.parent,
            round: place.round,
            index: place.index,
            node: place.node,
            seed: thread_seed(problem_seed, &tree_key),
            tree_key,
            state: ThreadState::Queued,
            slot: None,
            allowance,
            processed: 0,
            children: Vec::new(),
            children_done: 0,
            spawn_rounds: 0,
            segment_count: 0,
            ctx: Context::new(),
            draft: Draft::new(prompt),
        }
    }

    /// Ends the current segment as a record and starts an empty draft; returns the record with
    /// its [`segment_key`].
    pub(super) fn take_segment(&mut self, finish: Finish) -> (Vec<usize>, Segment) {
        let key = segment_key(&self.tree_key, self.segment_count);
        let held = self.ctx.tokens.len();
        let prompt_len = self.draft.prompt_tokens.unwrap_or(held).min(held);
        let draft = std::mem::replace(&mut self.draft, Draft::new(String::new()));
        let seg = Segment {
            role: self.role,
            round: match self.role {
                Role::Parent => self.segment_count,
                Role::Child => self.round,
            },
            index: self.index,
            node: self.node.as_ref().map(ToString::to_string),
            prompt: draft.prompt,
            output: self.ctx.text[draft.start_text.min(self.ctx.text.len())..].to_owned(),
            finish,
            prompt_tokens: self.ctx.tokens[..prompt_len].to_vec(),
            tokens: draft.tokens,
            logprobs: draft.logprobs,
            sampled: draft.sampled,
            reused_prefix: draft.reused_prefix,
        };
        // The next call's text starts where this one's ended, until a join or restart moves it.
        self.draft.start_text = draft.start_text;
        self.segment_count += 1;
        (key, seg)
    }
}

/// What a thread holds in its slot, mirrored on the host, and what it appends next.
pub(super) struct Context {
    /// Context tokens now in the slot (BOS first).
    pub(super) tokens: Vec<u32>,
    /// Text length after each token of `tokens` (BOS adds nothing).
    pub(super) text_ends: Vec<usize>,
    /// Full context text.
    pub(super) text: String,
    /// Tokens to append at the next step.
    pub(super) pending: Vec<u32>,
    /// The log-probability of `pending` when it is the one token just sampled; `None` when the
    /// runtime supplied it (prompt, join block, substitution).
    pub(super) pending_sampled: Option<f32>,
    /// Leading `pending` tokens that replay a context an evicted parent already held: compute,
    /// not new tokens, so they count toward no budget or metric.
    pub(super) replayed: usize,
    /// Watches the text for a join block the model writes itself.
    pub(super) stop: StopDetector,
}

impl Context {
    fn new() -> Context {
        Context {
            tokens: Vec::new(),
            text_ends: Vec::new(),
            text: String::new(),
            pending: Vec::new(),
            pending_sampled: None,
            replayed: 0,
            stop: StopDetector::new(&[JOIN_OPEN]),
        }
    }

    /// Where to rewind to keep the text up to byte `at`: the number of leading tokens whose text
    /// ends there or before (at least one, the BOS) and the text length they cover. `None` when
    /// the context holds no tokens.
    pub(super) fn boundary_at(&self, at: usize) -> Option<(usize, usize)> {
        let keep = self
            .text_ends
            .iter()
            .take_while(|&&e| e <= at)
            .count()
            .max(1)
            .min(self.tokens.len());
        (keep > 0).then(|| (keep, self.text_ends[keep - 1]))
    }

    /// Keeps the first `keep` tokens (the slot itself is truncated by the caller).
    pub(super) fn truncate(&mut self, keep: usize) {
        self.tokens.truncate(keep);
        self.text_ends.truncate(keep);
    }

    /// Frees the buffers once the problem's records are written.
    pub(super) fn clear(&mut self) {
        self.text = String::new();
        self.tokens = Vec::new();
        self.text_ends = Vec::new();
    }
}

/// The segment being written: the supplied context and what the model wrote after it.
pub(super) struct Draft {
    /// The context the runtime supplied, as text.
    pub(super) prompt: String,
    /// Its length in tokens, known once it is in the slot.
    pub(super) prompt_tokens: Option<usize>,
    /// Byte offset in the context text where this segment's output starts.
    pub(super) start_text: usize,
    pub(super) tokens: Vec<u32>,
    pub(super) logprobs: Vec<f32>,
    pub(super) sampled: Vec<bool>,
    pub(super) reused_prefix: usize,
}

impl Draft {
    fn new(prompt: String) -> Draft {
        Draft {
            prompt,
            prompt_tokens: None,
            start_text: 0,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            sampled: Vec::new(),
            reused_prefix: 0,
        }
    }

    /// Appends an output token: sampled with `logprob`, or injected by the runtime (`None`).
    pub(super) fn push(&mut self, token: u32, logprob: Option<f32>) {
        self.tokens.push(token);
        self.logprobs.push(logprob.unwrap_or(0.0));
        self.sampled.push(logprob.is_some());
    }

    /// Keeps the first `n` output tokens.
    pub(super) fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.logprobs.truncate(n);
        self.sampled.truncate(n);
    }
}

/// A thread's sampling seed: the problem's seed mixed with the thread's place in the tree.
pub(super) fn thread_seed(problem_seed: u64, tree_key: &[usize]) -> u64 {
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
pub(super) fn segment_key(tree_key: &[usize], call: usize) -> Vec<usize> {
    let mut key = tree_key.to_vec();
    key.push(2 * call);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewind_keeps_whole_tokens_and_the_bos() {
        let mut ctx = Context::new();
        // BOS, then tokens ending at bytes 3, 5 and 9.
        ctx.tokens = vec![1, 10, 11, 12];
        ctx.text_ends = vec![0, 3, 5, 9];
        assert_eq!(ctx.boundary_at(5), Some((3, 5)));
        assert_eq!(ctx.boundary_at(7), Some((3, 5)), "a token cut in half goes");
        assert_eq!(ctx.boundary_at(100), Some((4, 9)));
        ctx.text_ends[0] = 2; // a context whose first token already carries text
        assert_eq!(
            ctx.boundary_at(0),
            Some((1, 2)),
            "the first token always stays"
        );
        ctx.truncate(2);
        assert_eq!((ctx.tokens.len(), ctx.text_ends.len()), (2, 2));
        ctx.clear();
        assert_eq!(ctx.boundary_at(5), None);
    }

    #[test]
    fn seeds_and_keys_follow_the_tree_only() {
        let root = thread_seed(7, &[]);
        let child = thread_seed(7, &[1, 0]);
        assert_ne!(root, child);
        assert_ne!(child, thread_seed(7, &[1, 1]));
        assert_ne!(root, thread_seed(8, &[]));
        assert_eq!(
            child,
            thread_seed(7, &[1, 0]),
            "a pure function of (seed, place)"
        );
        // Parent call 0 < its children (key [1, i, 0]) < parent call 1.
        let call0 = segment_key(&[], 0);
        let kid = segment_key(&[1, 3], 0);
        let call1 = segment_key(&[], 1);
        assert!(call0 < kid && kid < call1);
    }
}
