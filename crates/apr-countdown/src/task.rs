//! Countdown as an APR [`Task`]: prompts, child prompts looked up in the parent's text, join
//! messages, answers and the binary reward.

use apr_core::{Mode, NodeId, Task, TaskError};

use crate::arith::push_list;
use crate::problem::Problem;
use crate::verify::{check_answer, final_answer};

/// The Countdown task.
#[derive(Clone, Copy, Debug)]
pub struct CountdownTask {
    /// Prompt format: APR's root prompt names its node (`Moving to Node #0`), SoS+'s does not.
    pub style: Mode,
}

impl CountdownTask {
    /// The task with `mode`'s prompts.
    pub fn new(mode: Mode) -> Self {
        CountdownTask { style: mode }
    }

    /// The APR task.
    pub fn apr() -> Self {
        Self::new(Mode::Apr)
    }

    /// The serial (SoS+) task.
    pub fn sosp() -> Self {
        Self::new(Mode::Serial)
    }
}

/// The root prompt in a given style (no trailing newline: the model writes it).
pub fn root_prompt(problem: &Problem, style: Mode) -> String {
    let mut out = String::with_capacity(64);
    if style == Mode::Apr {
        out.push_str("Moving to Node #0\n");
    }
    out.push_str("Current State: ");
    out.push_str(&problem.target.to_string());
    out.push(':');
    push_list(&mut out, &problem.nums);
    out.push_str(", Operations: []");
    out
}

/// A node's state as read from a parent's text.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeState<'a> {
    target: i64,
    nums: Vec<i64>,
    ops: Vec<&'a str>,
}

impl NodeState<'_> {
    fn prompt(&self, node: &NodeId) -> String {
        let mut out = String::with_capacity(96);
        out.push_str("Moving to Node #");
        out.push_str(node.as_str());
        out.push_str("\nCurrent State: ");
        out.push_str(&self.target.to_string());
        out.push(':');
        push_list(&mut out, &self.nums);
        out.push_str(", Operations: [");
        for (i, op) in self.ops.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push('\'');
            out.push_str(op);
            out.push('\'');
        }
        out.push(']');
        out
    }
}

/// Parses `T:[a, b, c]` at the start of `s`, returning the rest.
fn parse_state(s: &str) -> Option<(i64, Vec<i64>, &str)> {
    let (target, rest) = s.split_once(":[")?;
    let target = target.trim().parse().ok()?;
    let (inner, rest) = rest.split_once(']')?;
    let nums = if inner.trim().is_empty() {
        Vec::new()
    } else {
        inner
            .split(", ")
            .map(|n| n.parse().ok())
            .collect::<Option<Vec<i64>>>()?
    };
    Some((target, nums, rest))
}

/// Parses `['a+b=c', 'd*e=f']` exactly.
fn parse_ops(s: &str) -> Option<Vec<&str>> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(", ")
        .map(|item| {
            let op = item.strip_prefix('\'')?.strip_suffix('\'')?;
            let valid = !op.is_empty()
                && op
                    .bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'*' | b'/' | b'='));
            valid.then_some(op)
        })
        .collect()
}

/// Finds a node's state in a parent's text.
///
/// A node is defined by the line that generated it, `Generated Node #id: T:[..] Operation: op`
/// (its operations are its parent's plus `op`); the root, which no line generates, by the first
/// `Moving to Node #id` line followed by a `Current State` line (the prompt).
///
/// The reference runtime (`get_subsearch_info`) prefers the *last* `Moving to Node` +
/// `Current State` pair instead. The two agree on consistent text, but the reference solver
/// itself writes a mislabelled `Moving to Node` line after a spawn whose children all fail (its
/// loop variable is shadowed), in about 0.04% of APR records; the reference runtime would then
/// hand the child another node's state, while the solver's child (what the model was trained on)
/// got the generated state. We follow the generating line.
fn lookup<'a>(text: &'a str, node: &NodeId, depth: usize) -> Result<NodeState<'a>, TaskError> {
    let malformed = |reason: &str| TaskError::MalformedNode {
        node: node.clone(),
        reason: reason.to_owned(),
    };
    let generated = format!("Generated Node #{node}: ");
    if let Some(line) = text
        .lines()
        .find_map(|l| l.find(&generated).map(|p| &l[p + generated.len()..]))
    {
        let (target, nums, rest) =
            parse_state(line).ok_or_else(|| malformed("unreadable Generated Node line"))?;
        let op = rest
            .strip_prefix(" Operation: ")
            .map(str::trim)
            .filter(|op| parse_ops(&format!("['{op}']")).is_some())
            .ok_or_else(|| malformed("unreadable operation"))?;
        // Ids are a few components deep; the bound keeps hostile text from recursing far.
        let parent = node
            .parent()
            .filter(|_| depth < 16)
            .ok_or_else(|| malformed("generated node without a parent id"))?;
        let mut ops = lookup(text, &parent, depth + 1)?.ops;
        ops.push(op);
        return Ok(NodeState { target, nums, ops });
    }
    let moving = format!("Moving to Node #{node}");
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(pos) = line.find(&moving) else {
            continue;
        };
        if !line[pos + moving.len()..].trim().is_empty() {
            continue;
        }
        let Some(state_line) = lines.peek().filter(|l| l.contains("Current State:")) else {
            continue;
        };
        let after = state_line
            .split_once("Current State:")
            .map(|(_, a)| a.trim_start())
            .ok_or_else(|| malformed("no state"))?;
        let (target, nums, rest) =
            parse_state(after).ok_or_else(|| malformed("unreadable Current State line"))?;
        let ops = rest
            .strip_prefix(", Operations: ")
            .and_then(parse_ops)
            .ok_or_else(|| malformed("unreadable operation list"))?;
        return Ok(NodeState { target, nums, ops });
    }
    Err(TaskError::UnknownNode(node.clone()))
}

impl Task for CountdownTask {
    type Problem = Problem;

    fn parent_prompt(&self, problem: &Problem) -> String {
        root_prompt(problem, self.style)
    }

    fn child_prompt(&self, parent_text: &str, node: &NodeId) -> Result<String, TaskError> {
        Ok(lookup(parent_text, node, 0)?.prompt(node))
    }

    fn join_message(&self, child_text: &str) -> Option<String> {
        final_answer(child_text).map(str::to_owned)
    }

    fn final_answer(&self, root_text: &str) -> Option<String> {
        final_answer(root_text).map(str::to_owned)
    }

    fn reward(&self, problem: &Problem, answer: Option<&str>) -> f32 {
        match answer {
            Some(a) if check_answer(&problem.nums, problem.target, a) => 1.0,
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\nExploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\nGenerated Node #0,2: 27:[26, 31, 31] Operation: 53-22=31\n<Calling Sub Searches>\n";

    #[test]
    fn child_prompt_from_generated_and_moving_lines() {
        let task = CountdownTask::apr();
        let node = NodeId::parse("0,2").unwrap();
        assert_eq!(
            task.child_prompt(PARENT, &node).unwrap(),
            "Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']"
        );
        let deeper = format!("{PARENT}Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\nGenerated Node #0,2,1: 27:[26, 1] Operation: 31/31=1\n");
        assert_eq!(
            task.child_prompt(&deeper, &NodeId::parse("0,2,1").unwrap())
                .unwrap(),
            "Moving to Node #0,2,1\nCurrent State: 27:[26, 1], Operations: ['53-22=31', '31/31=1']"
        );
        assert_eq!(
            task.child_prompt(PARENT, &NodeId::parse("0,7").unwrap()),
            Err(TaskError::UnknownNode(NodeId::parse("0,7").unwrap()))
        );
        assert!(task
            .child_prompt(
                "Generated Node #0,1: 27:[x] Operation: 1+1=2\n",
                &NodeId::parse("0,1").unwrap()
            )
            .is_err());
    }
}
