//! Supervised fine-tuning views of trace records (spec §3.5): SoS+ trains on one sequence per
//! problem, APR on every call (parent calls and child calls) as its own sequence.

use apr_core::Conditioning;
use serde::{Deserialize, Serialize};

use crate::record::{TokenCounter, TraceRecord};
use crate::search::TraceDict;

/// Which view to take of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SftView {
    /// Every call its own sequence.
    Apr,
    /// The whole serial trace as one sequence.
    Sosp,
}

/// Optional conditioning prefixes on the sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SftOptions {
    /// Prefix APR parent calls with `Sub Call Budget: N `, N the children per spawn round
    /// (rounded up; 0 when the parent never spawns). Children get no prefix (spec §6.1).
    pub sub_call_budget: bool,
    /// Prefix SoS+ traces with `Token Budget: B `, B the 512-token bin of the trace (cap 4,096).
    pub token_budget: bool,
}

/// One training sequence: the prompt part (what the runtime supplies) and the whole text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftSequence {
    /// The full text (prompt included); a trainer wraps it in BOS … EOS.
    pub text: String,
    /// Length in bytes of the prompt at the start of `text` (for optional prompt masking).
    pub prompt_len: usize,
}

/// The sequences of one record.
pub fn sequences(
    record: &TraceRecord,
    view: SftView,
    options: SftOptions,
    counter: &dyn TokenCounter,
) -> Vec<SftSequence> {
    match (view, &record.trace_dict) {
        (SftView::Apr, Some(dict)) => {
            let mut cond = Conditioning::default();
            if options.sub_call_budget {
                cond.sub_call_budget = Some(record.sub_call_count.ceil().max(0.0) as u32);
            }
            let mut out = Vec::new();
            push_dict(dict, &cond.prefix(), &mut out);
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
            }]
        }
    }
}

/// Parent calls get `parent_prefix`; every child call is a sequence too. The prompt of a first
/// call is its first two lines (`Moving to Node` + `Current State`); of a post-join call, all
/// text up to the end of its join block (the runtime wrote it).
fn push_dict(dict: &TraceDict, parent_prefix: &str, out: &mut Vec<SftSequence>) {
    for (i, call) in dict.main_calls.iter().enumerate() {
        let prompt = if i == 0 {
            prompt_len(call, 2)
        } else {
            call.rfind(apr_core::grammar::JOIN_CLOSE)
                .map_or(0, |p| p + apr_core::grammar::JOIN_CLOSE.len() + 1)
                .min(call.len())
        };
        out.push(SftSequence {
            text: format!("{parent_prefix}{call}"),
            prompt_len: parent_prefix.len() + prompt,
        });
    }
    for round in &dict.sub_calls {
        for child in round {
            push_dict(child, "", out);
        }
    }
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
