//! Supervised fine-tuning views of trace records (spec §3.5): SoS+ trains on one sequence per
//! problem, APR on every call (parent calls and child calls) as its own sequence. Each sequence
//! also says which of its bytes the runtime writes at inference, so a trainer can place the
//! loss (`LossPlacement`).

use std::ops::Range;

use apr_core::{Conditioning, Mode};
use serde::{Deserialize, Serialize};

use crate::record::{TokenCounter, TraceRecord};
use crate::search::TraceDict;

/// Optional conditioning prefixes on the sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SftOptions {
    /// Prefix APR parent calls with `Sub Call Budget: N `, N the children per spawn round
    /// (rounded up; 0 when the parent never spawns). Children get no prefix (spec §6.1).
    pub sub_call_budget: bool,
    /// Prefix SoS+ traces with `Token Budget: B `, B the 512-token bin of the trace (cap 4,096).
    pub token_budget: bool,
}

/// Which tokens of a sequence carry the SFT loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossPlacement {
    /// Every token (the reference's choice).
    #[default]
    All,
    /// No loss on text the runtime writes into a thread: a child's prompt and a join block.
    Generated,
    /// As `Generated`, and a post-join parent call only after its join block: its text before
    /// the spawn was trained in the call before it, so every generated token is trained once
    /// (what GRPO does).
    Once,
}

impl LossPlacement {
    /// Every placement, in the order the names list them.
    pub const ALL: [LossPlacement; 3] = [Self::All, Self::Generated, Self::Once];

    /// The name the CLI and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Generated => "generated",
            Self::Once => "once",
        }
    }
}

impl std::fmt::Display for LossPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossPlacement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown loss placement {s:?} (all, generated or once)"))
    }
}

/// One training sequence: its text and the spans the runtime, not the model, writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftSequence {
    /// The full text (prompt included); a trainer wraps it in BOS … EOS.
    pub text: String,
    /// Length in bytes of the prompt at the start of `text` (an APR call's first two lines, an
    /// SoS+ trace's first, with any conditioning prefix).
    pub prompt_len: usize,
    /// Whether the prompt was written by the runtime (a child's) rather than given (the root's).
    #[serde(default)]
    pub child: bool,
    /// A post-join call's join block (`<Sub Searches>` … `<End Sub Searches>\n`), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<Range<usize>>,
}

impl SftSequence {
    /// Byte ranges of `text` that carry no loss under `placement` (sorted, disjoint); with
    /// `mask_prompt` the given prompt (the root's, an SoS+ trace's) carries none either.
    pub fn untrained(&self, placement: LossPlacement, mask_prompt: bool) -> Vec<Range<usize>> {
        let prompt = 0..self.prompt_len;
        let mut out = Vec::new();
        match placement {
            LossPlacement::All => {
                if mask_prompt {
                    out.push(prompt);
                }
                return out;
            }
            LossPlacement::Generated => {
                if self.child || mask_prompt {
                    out.push(prompt);
                }
                out.extend(self.join.clone());
            }
            LossPlacement::Once => match &self.join {
                Some(join) => out.push(0..join.end),
                None if self.child || mask_prompt => out.push(prompt),
                None => {}
            },
        }
        out.retain(|r| !r.is_empty());
        out
    }
}

/// The sequences of one record.
pub fn sequences(
    record: &TraceRecord,
    view: Mode,
    options: SftOptions,
    counter: &dyn TokenCounter,
) -> Vec<SftSequence> {
    match (view, &record.trace_dict) {
        (Mode::Apr, Some(dict)) => {
            let mut cond = Conditioning::default();
            if options.sub_call_budget {
                cond.sub_call_budget = Some(record.sub_call_count.ceil().max(0.0) as u32);
            }
            let mut out = Vec::new();
            push_dict(dict, &cond.prefix(), false, &mut out);
            out
        }
        _ => {
            let mut cond = Conditioning::default();
            if options.token_budget {
                let tokens = counter.sequence(&record.search_path);
                cond.token_budget = Some(Conditioning::token_budget_bin(tokens, 4096));
            }
            let prefix = cond.prefix();
            let prompt = prompt_len(&record.search_path, 1);
            vec![SftSequence {
                text: format!("{prefix}{}", record.search_path),
                prompt_len: prefix.len() + prompt,
                child: false,
                join: None,
            }]
        }
    }
}

/// Parent calls get `parent_prefix`; every child call is a sequence too. A call's prompt is its
/// first two lines (`Moving to Node` + `Current State`); a post-join call also holds the join
/// block the runtime appended after the parent's text before its spawn.
fn push_dict(dict: &TraceDict, parent_prefix: &str, child: bool, out: &mut Vec<SftSequence>) {
    for (i, call) in dict.main_calls.iter().enumerate() {
        let join = (i > 0).then(|| join_block(call)).flatten();
        out.push(SftSequence {
            text: format!("{parent_prefix}{call}"),
            prompt_len: parent_prefix.len() + prompt_len(call, 2),
            child,
            join: join.map(|r| r.start + parent_prefix.len()..r.end + parent_prefix.len()),
        });
    }
    for round in &dict.sub_calls {
        for sub in round {
            push_dict(sub, "", true, out);
        }
    }
}

/// The last join block of a call, through the newline after its closing tag.
fn join_block(call: &str) -> Option<Range<usize>> {
    use apr_core::grammar::{JOIN_CLOSE, JOIN_OPEN};
    let close = call.rfind(JOIN_CLOSE)?;
    let open = call[..close].rfind(JOIN_OPEN)?;
    let end = (close + JOIN_CLOSE.len() + 1).min(call.len());
    Some(open..end)
}

/// Bytes of the first `lines` lines, without the last newline (prompts end without one).
fn prompt_len(text: &str, lines: usize) -> usize {
    let mut end = 0;
    for _ in 0..lines {
        match text[end..].find('\n') {
            Some(p) => end += p + 1,
            None => return text.len(),
        }
    }
    end.saturating_sub(1)
}
