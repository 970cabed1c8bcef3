//! What the protocol asks of a task: the grammar is task-agnostic, the task says what a child's
//! prompt is, what a finished child returns, what the final answer is and what it is worth.

use crate::grammar::NodeId;

/// Why a task could not build a child's prompt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The parent's text never describes the node a spawn block names.
    #[error("node #{0} is not described in the parent's text")]
    UnknownNode(NodeId),
    /// The parent's text describes the node in a form the task cannot read.
    #[error("node #{node} is malformed in the parent's text: {reason}")]
    MalformedNode {
        /// The node.
        node: NodeId,
        /// What was wrong.
        reason: String,
    },
}

/// A task solved by a tree of threads.
///
/// Implementations must be pure functions of their inputs and must not panic on any text: the
/// text comes from a model.
pub trait Task: Send + Sync {
    /// One problem instance.
    type Problem: Send + Sync;

    /// The root thread's prompt for a problem (without conditioning prefixes).
    fn parent_prompt(&self, problem: &Self::Problem) -> String;

    /// The prompt of the child that explores `node`, built from the parent's text.
    fn child_prompt(&self, parent_text: &str, node: &NodeId) -> Result<String, TaskError>;

    /// What a finished child returns to its parent: `Some(path)` if it solved its sub-problem,
    /// `None` for "no solution".
    fn join_message(&self, child_text: &str) -> Option<String>;

    /// The final answer a finished root thread states, if any.
    fn final_answer(&self, root_text: &str) -> Option<String>;

    /// The reward of an answer (1.0 correct, 0.0 otherwise for a binary task).
    fn reward(&self, problem: &Self::Problem, answer: Option<&str>) -> f32;
}
