//! The symbolic solvers that write training traces (spec §3): SoS+ (serial hybrid BFS/DFS) and
//! APR (the same search, with sub-searches handed to child threads).
//!
//! The output is byte-identical to the reference's `sosp()` / `apr()` for the same random
//! stream, including its quirks, which are kept on purpose so that our data is interchangeable
//! with the released data:
//! * beam pruning is a stable sort by heuristic, then a shuffle of the kept successors, ids in
//!   shuffled order, then a stable sort of the non-terminal ones (unless
//!   [`SuccessorOrder::Expansion`] is asked for: see there);
//! * the open set is a binary heap with Python `heapq`'s exact sift order (ties are not broken by
//!   insertion order);
//! * after an APR spawn whose children all fail, the reference's loop variable is shadowed, so
//!   the `Moving to Node` line that follows names `batch[children]` (or is missing).

use crate::arith::{combine, push_int, push_list, push_op_list, Heuristic, Op, MAX_NUMS};
use crate::pyrand::PyRandom;
use apr_core::{JoinBlock, JoinEntry, NodeId, SpawnBlock};
use serde::{Deserialize, Serialize};

const NO_PARENT: u32 = u32::MAX;

/// The order in which an expansion prints its kept successors.
///
/// The reference prints them shuffled (spec §3.1). A small model imitating that order has to
/// remember which of up to ten successors it already wrote, and at CPU scale it does not: 40–60%
/// of the root operations the quick pipeline's models wrote repeated an earlier one. In expansion
/// order (pairs `i < j` in order, then `+ * - /`) each line follows from the one before. Which
/// successors are kept and the random draws are the same in both orders; the printed order, the
/// ids and the order among successors of equal heuristic differ (after such a tie the rest of a
/// search may differ too; on 20,000 quick problems both solvers solved exactly as many).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuccessorOrder {
    /// The reference's order: the kept successors shuffled.
    #[default]
    Shuffled,
    /// The order in which they were generated.
    Expansion,
}

impl SuccessorOrder {
    /// Whether this is the reference's order.
    pub fn is_shuffled(&self) -> bool {
        *self == SuccessorOrder::Shuffled
    }
}

/// A search node in the arena.
#[derive(Clone, Copy, Debug)]
struct Node {
    nums: [i64; MAX_NUMS],
    len: u8,
    /// The operation that produced this node from its parent.
    op: Option<Op>,
    parent: u32,
    /// Printed id components (`0,2,3` → [0, 2, 3]).
    id: [u16; MAX_NUMS + 1],
    id_len: u8,
    h: i64,
}

impl Node {
    fn nums(&self) -> &[i64] {
        &self.nums[..self.len as usize]
    }
}

/// The calls of one APR search (the reference's `trace_dict`): the parent's calls in order (the
/// first call, then one per join) and, per spawn round, the children's own trace dicts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceDict {
    /// The parent's calls: call `k + 1` starts with call `k`'s pre-spawn text plus a join block.
    pub main_calls: Vec<String>,
    /// One list per spawn round, one trace dict per child.
    #[serde(default)]
    pub sub_calls: Vec<Vec<TraceDict>>,
}

impl TraceDict {
    /// Every call of this tree, parents first then children depth-first (the reference's
    /// `add_all_calls` order).
    pub fn all_calls(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_calls(&mut out);
        out
    }

    fn collect_calls<'a>(&'a self, out: &mut Vec<&'a str>) {
        out.extend(self.main_calls.iter().map(String::as_str));
        for round in &self.sub_calls {
            for child in round {
                child.collect_calls(out);
            }
        }
    }

    /// Number of child threads over all rounds (recursively).
    pub fn child_count(&self) -> usize {
        self.sub_calls
            .iter()
            .flatten()
            .map(|c| 1 + c.child_count())
            .sum()
    }
}

/// Scratch state of one search, reused across problems to avoid allocation.
pub struct Searcher {
    target: i64,
    heuristic: Heuristic,
    arena: Vec<Node>,
    rng: PyRandom,
    order: SuccessorOrder,
    /// Expansion scratch: (heuristic, operation, operand indices, position in expansion order).
    generated: Vec<(i64, Op, u8, u8, u8)>,
    ops_scratch: Vec<Op>,
}

impl Searcher {
    /// A searcher for one problem, drawing from `rng`, printing successors in `order`.
    pub fn new(target: i64, rng: PyRandom, order: SuccessorOrder) -> Self {
        Searcher {
            target,
            heuristic: Heuristic::new(target),
            arena: Vec::with_capacity(1024),
            rng,
            order,
            generated: Vec::with_capacity(64),
            ops_scratch: Vec::with_capacity(MAX_NUMS),
        }
    }

    /// The random stream (e.g. to draw beam sizes before searching, as the reference does).
    pub fn rng(&mut self) -> &mut PyRandom {
        &mut self.rng
    }

    fn root(&mut self, nums: &[i64]) -> u32 {
        let mut node = Node {
            nums: [0; MAX_NUMS],
            len: nums.len() as u8,
            op: None,
            parent: NO_PARENT,
            id: [0; MAX_NUMS + 1],
            id_len: 1,
            h: 0,
        };
        node.nums[..nums.len()].copy_from_slice(nums);
        node.h = self.heuristic.of(nums);
        self.arena.push(node);
        (self.arena.len() - 1) as u32
    }

    fn write_id(&self, out: &mut String, node: u32) {
        let n = &self.arena[node as usize];
        for (i, part) in n.id[..n.id_len as usize].iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_int(out, *part as i64);
        }
    }

    fn node_id(&self, node: u32) -> NodeId {
        let mut s = String::new();
        self.write_id(&mut s, node);
        NodeId::parse(&s).expect("solver ids are well formed")
    }

    /// `T:[nums]`.
    fn write_state(&self, out: &mut String, node: u32) {
        push_int(out, self.target);
        out.push(':');
        push_list(out, self.arena[node as usize].nums());
    }

    fn write_current_state(&mut self, out: &mut String, node: u32) {
        out.push_str("Current State: ");
        self.write_state(out, node);
        out.push_str(", Operations: ");
        self.ops_scratch.clear();
        let mut cur = node;
        while let Some(op) = self.arena[cur as usize].op {
            self.ops_scratch.push(op);
            cur = self.arena[cur as usize].parent;
        }
        push_op_list(out, self.ops_scratch.iter().rev());
        out.push('\n');
    }

    fn write_moving(&self, out: &mut String, node: u32) {
        out.push_str("Moving to Node #");
        self.write_id(out, node);
        out.push('\n');
    }

    fn write_goal_line(&self, out: &mut String, value: i64) {
        push_int(out, value);
        out.push(',');
        push_int(out, self.target);
        out.push_str(" equal: Goal Reached\n");
    }

    /// `Exploring Operation: op, Resulting Numbers: [..]`.
    fn write_exploring(&self, out: &mut String, node: u32) {
        let n = &self.arena[node as usize];
        out.push_str("Exploring Operation: ");
        if let Some(op) = n.op {
            op.write(out);
        }
        out.push_str(", Resulting Numbers: ");
        push_list(out, n.nums());
        out.push('\n');
    }

    /// `Generated Node #id: T:[..] Operation: op`.
    fn write_generated(&self, out: &mut String, node: u32) {
        out.push_str("Generated Node #");
        self.write_id(out, node);
        out.push_str(": ");
        self.write_state(out, node);
        out.push_str(" Operation: ");
        if let Some(op) = self.arena[node as usize].op {
            op.write(out);
        }
        out.push('\n');
    }

    /// The summary path from `start` to the goal node (`get_path_to_target`).
    fn write_path(&mut self, out: &mut String, goal: u32, start: u32) {
        let mut path = Vec::with_capacity(MAX_NUMS);
        let mut cur = goal;
        while cur != start && cur != NO_PARENT {
            path.push(cur);
            cur = self.arena[cur as usize].parent;
        }
        path.push(start);
        path.reverse();
        self.write_moving(out, start);
        for pair in path.windows(2) {
            let (node, next) = (pair[0], pair[1]);
            self.write_current_state(out, node);
            self.write_exploring(out, next);
            let next_node = &self.arena[next as usize];
            if next_node.len == 1 && next_node.nums[0] == self.target {
                self.write_goal_line(out, self.target);
                return;
            }
            self.write_generated(out, next);
            self.write_moving(out, next);
        }
    }

    /// Expands `node`: prunes to `beam`, shuffles, prints the kept successors and returns either
    /// the goal node or the non-terminal successors sorted by heuristic.
    fn expand(&mut self, out: &mut String, node: u32, beam: usize) -> Expansion {
        self.write_current_state(out, node);
        let parent = self.arena[node as usize];
        let nums = parent.nums();
        self.generated.clear();
        let mut ops = [Op::ZERO; 4];
        // Successors are scored without building them: the heuristic is a sum over numbers, so
        // a successor's is the parent's minus its two operands' plus the result's.
        let base = parent.h;
        for i in 0..nums.len() {
            for j in i + 1..nums.len() {
                let count = combine(nums[i], nums[j], &mut ops);
                let rest = base - self.heuristic.of(&[nums[i], nums[j]]);
                for op in &ops[..count] {
                    let h = rest + self.heuristic.of(&[op.result]);
                    let position = self.generated.len() as u8;
                    self.generated.push((h, *op, i as u8, j as u8, position));
                }
            }
        }
        // Stable sort by heuristic, keep the best `beam`, then shuffle (spec §3.1). The shuffle
        // draws from the stream in both orders, so that every later draw is the same.
        self.generated.sort_by_key(|g| g.0);
        self.generated.truncate(beam);
        let mut kept = std::mem::take(&mut self.generated);
        self.rng.shuffle(&mut kept);
        if self.order == SuccessorOrder::Expansion {
            kept.sort_unstable_by_key(|g| g.4);
        }
        let mut kept_nodes = Vec::with_capacity(kept.len());
        for &(h, op, i, j, _) in &kept {
            let mut child = Node {
                nums: [0; MAX_NUMS],
                len: (nums.len() - 1) as u8,
                op: Some(op),
                parent: node,
                id: parent.id,
                id_len: parent.id_len + 1,
                h,
            };
            let mut k = 0;
            for (m, &n) in nums.iter().enumerate() {
                if m != i as usize && m != j as usize {
                    child.nums[k] = n;
                    k += 1;
                }
            }
            child.nums[k] = op.result;
            self.arena.push(child);
            kept_nodes.push((self.arena.len() - 1) as u32);
        }
        self.generated = kept;
        let mut next_index: u16 = 0;
        let mut to_explore = Vec::with_capacity(kept_nodes.len());
        let mut goal = None;
        for &idx in &kept_nodes {
            let child = &mut self.arena[idx as usize];
            child.id[child.id_len as usize - 1] = next_index;
            let child = *child;
            self.write_exploring(out, idx);
            if child.len == 1 {
                if child.nums[0] == self.target {
                    push_int(out, child.nums[0]);
                    out.push(',');
                    push_int(out, self.target);
                    out.push_str(" equal: Goal Reached\n");
                    goal = Some(idx);
                    break;
                }
                push_int(out, child.nums[0]);
                out.push(',');
                push_int(out, self.target);
                out.push_str(" unequal: No Solution\n");
            } else {
                self.write_generated(out, idx);
                next_index += 1;
                to_explore.push(idx);
            }
        }
        match goal {
            Some(g) => Expansion::Goal(g),
            None => {
                to_explore.sort_by_key(|&i| self.arena[i as usize].h);
                Expansion::Successors(to_explore)
            }
        }
    }

    fn heap_push(&self, heap: &mut Vec<(i64, u32)>, node: u32) {
        heap_push(heap, (self.arena[node as usize].h, node));
    }

    /// SoS+ (`_search`): returns whether the goal was reached. `root` anchors summary paths.
    fn sosp_search(
        &mut self,
        out: &mut String,
        start: u32,
        root: u32,
        beam: usize,
        promising: f64,
        level: u32,
    ) -> bool {
        let mut heap: Vec<(i64, u32)> = Vec::with_capacity(16);
        self.heap_push(&mut heap, start);
        while !heap.is_empty() {
            let take = beam.min(heap.len());
            let batch: Vec<u32> = (0..take).map(|_| heap_pop(&mut heap).1).collect();
            for (idx, &node) in batch.iter().enumerate() {
                match self.expand(out, node, beam) {
                    Expansion::Goal(goal) => {
                        self.write_path(out, goal, root);
                        return true;
                    }
                    Expansion::Successors(kids) => {
                        let double_down = self.rng.random() < promising;
                        for &kid in &kids {
                            if double_down {
                                out.push_str("Start Sub Search at level ");
                                push_int(out, level as i64 + 1);
                                out.push_str(": ");
                                self.write_moving(out, kid);
                                let solved =
                                    self.sosp_search(out, kid, root, beam, promising, level + 1);
                                out.push_str("Exit Sub Search at level ");
                                push_int(out, level as i64 + 1);
                                out.push('\n');
                                if solved {
                                    return true;
                                }
                                out.push_str("No solution found in sub search\n");
                            } else {
                                self.heap_push(&mut heap, kid);
                            }
                        }
                    }
                }
                if idx + 1 < batch.len() {
                    self.write_moving(out, batch[idx + 1]);
                }
            }
            if let Some(&(_, top)) = heap.first() {
                self.write_moving(out, top);
            }
        }
        out.push_str("No solution found.\n");
        false
    }

    /// APR (`_parallel_search`): returns the trace dict and the goal node, if reached.
    fn apr_search(
        &mut self,
        start: u32,
        beam: usize,
        sub_beam: usize,
        promising: f64,
        level: u32,
    ) -> (TraceDict, Option<u32>) {
        let mut dict = TraceDict::default();
        let mut cur = String::with_capacity(2048);
        self.write_moving(&mut cur, start);
        let mut heap: Vec<(i64, u32)> = Vec::with_capacity(16);
        self.heap_push(&mut heap, start);
        while !heap.is_empty() {
            let take = beam.min(heap.len());
            let batch: Vec<u32> = (0..take).map(|_| heap_pop(&mut heap).1).collect();
            for (idx, &node) in batch.iter().enumerate() {
                // The reference reuses `idx` as the loop variable over children, so after a
                // failed spawn the transition below is computed from the child count.
                let mut transition_idx = idx;
                match self.expand(&mut cur, node, beam) {
                    Expansion::Goal(goal) => {
                        self.write_path(&mut cur, goal, start);
                        dict.main_calls.push(cur);
                        return (dict, Some(goal));
                    }
                    Expansion::Successors(kids) => {
                        let spawn = level == 0 && kids.len() > 1 && self.rng.random() < promising;
                        if spawn {
                            let mut round = Vec::with_capacity(kids.len());
                            let mut goals = Vec::with_capacity(kids.len());
                            for &kid in &kids {
                                let (child, goal) =
                                    self.apr_search(kid, sub_beam, sub_beam, promising, level + 1);
                                round.push(child);
                                goals.push(goal);
                            }
                            dict.sub_calls.push(round);
                            let before = cur.clone();
                            let children: Vec<NodeId> =
                                kids.iter().map(|&k| self.node_id(k)).collect();
                            SpawnBlock {
                                level: level + 1,
                                children: children.clone(),
                            }
                            .write_to(&mut cur);
                            dict.main_calls.push(std::mem::replace(&mut cur, before));
                            let entries = children
                                .into_iter()
                                .zip(kids.iter().zip(&goals))
                                .map(|(node, (&kid, goal))| JoinEntry {
                                    node,
                                    result: goal.map(|g| {
                                        let mut path = String::with_capacity(512);
                                        self.write_path(&mut path, g, kid);
                                        path.pop(); // the join block adds the newline back
                                        path
                                    }),
                                })
                                .collect();
                            JoinBlock {
                                level: level + 1,
                                entries,
                            }
                            .write_to(&mut cur);
                            if let Some(goal) = goals.iter().flatten().next() {
                                let value = self.arena[*goal as usize].nums[0];
                                self.write_goal_line(&mut cur, value);
                                self.write_path(&mut cur, *goal, start);
                                dict.main_calls.push(cur);
                                return (dict, Some(*goal));
                            }
                            transition_idx = kids.len() - 1;
                        } else {
                            for &kid in &kids {
                                self.heap_push(&mut heap, kid);
                            }
                        }
                    }
                }
                if transition_idx + 1 < batch.len() {
                    self.write_moving(&mut cur, batch[transition_idx + 1]);
                }
            }
            if let Some(&(_, top)) = heap.first() {
                self.write_moving(&mut cur, top);
            }
        }
        cur.push_str("No solution found.\n");
        dict.main_calls.push(cur);
        (dict, None)
    }
}

enum Expansion {
    Goal(u32),
    Successors(Vec<u32>),
}

/// `heapq.heappush` with Python's sift order; items compare by heuristic only.
fn heap_push(heap: &mut Vec<(i64, u32)>, item: (i64, u32)) {
    heap.push(item);
    let last = heap.len() - 1;
    sift_down(heap, 0, last);
}

/// `heapq.heappop` with Python's sift order.
fn heap_pop(heap: &mut Vec<(i64, u32)>) -> (i64, u32) {
    let last = heap.pop().expect("pop from a non-empty heap");
    if heap.is_empty() {
        return last;
    }
    let top = std::mem::replace(&mut heap[0], last);
    sift_up(heap, 0);
    top
}

/// Moves `heap[pos]` towards the root while it is strictly smaller than its parent.
fn sift_down(heap: &mut [(i64, u32)], start: usize, mut pos: usize) {
    let item = heap[pos];
    while pos > start {
        let parent = (pos - 1) >> 1;
        if item.0 < heap[parent].0 {
            heap[pos] = heap[parent];
            pos = parent;
        } else {
            break;
        }
    }
    heap[pos] = item;
}

/// Python's bottom-up `_siftup`: walk the smaller child down to a leaf, then sift back up.
fn sift_up(heap: &mut [(i64, u32)], mut pos: usize) {
    let end = heap.len();
    let start = pos;
    let item = heap[pos];
    let mut child = 2 * pos + 1;
    while child < end {
        let right = child + 1;
        if right < end && heap[child].0 >= heap[right].0 {
            child = right;
        }
        heap[pos] = heap[child];
        pos = child;
        child = 2 * pos + 1;
    }
    heap[pos] = item;
    sift_down(heap, start, pos);
}

/// Result of one SoS+ run.
#[derive(Clone, Debug)]
pub struct SospTrace {
    /// The whole serial trace.
    pub search_path: String,
    /// Whether the goal was reached.
    pub solved: bool,
}

/// Result of one APR run.
#[derive(Clone, Debug)]
pub struct AprTrace {
    /// Every call of the tree.
    pub trace: TraceDict,
    /// Whether the goal was reached.
    pub solved: bool,
}

impl AprTrace {
    /// The reference's `search_path`: the parent's last call.
    pub fn search_path(&self) -> &str {
        self.trace
            .main_calls
            .last()
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// The SoS+ solver (`sosp`): serial search with probability-`promising` sub-searches.
pub fn sosp(
    target: i64,
    nums: &[i64],
    beam: usize,
    promising: f64,
    order: SuccessorOrder,
    rng: &mut PyRandom,
) -> SospTrace {
    let mut searcher = Searcher::new(target, rng.clone(), order);
    let root = searcher.root(nums);
    let mut out = String::with_capacity(4096);
    let solved = searcher.sosp_search(&mut out, root, root, beam.max(1), promising, 0);
    *rng = searcher.rng;
    SospTrace {
        search_path: out,
        solved,
    }
}

/// The APR solver (`apr`): the parent spawns one child per kept successor when at level 0 with
/// at least two non-terminal successors and `rand < promising`; children search with
/// `sub_beam` and never spawn.
pub fn apr(
    target: i64,
    nums: &[i64],
    beam: usize,
    sub_beam: usize,
    promising: f64,
    order: SuccessorOrder,
    rng: &mut PyRandom,
) -> AprTrace {
    let mut searcher = Searcher::new(target, rng.clone(), order);
    let root = searcher.root(nums);
    let (trace, goal) = searcher.apr_search(root, beam.max(1), sub_beam.max(1), promising, 0);
    *rng = searcher.rng;
    AprTrace {
        trace,
        solved: goal.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_matches_python_heapq_order() {
        // Python: items with equal keys come out in heap order, not insertion order.
        let mut heap = Vec::new();
        for (i, h) in [3, 1, 3, 1, 2, 1, 3, 2, 2, 1].into_iter().enumerate() {
            heap_push(&mut heap, (h, i as u32));
        }
        let popped: Vec<u32> = (0..10).map(|_| heap_pop(&mut heap).1).collect();
        assert_eq!(popped, [1, 5, 3, 9, 4, 8, 7, 2, 6, 0]);
    }

    /// The operations of `Exploring Operation` lines between `Current State` lines, per expansion.
    fn expansions(trace: &str) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        for line in trace.lines() {
            if line.starts_with("Current State") {
                out.push(Vec::new());
            } else if let Some(rest) = line.strip_prefix("Exploring Operation: ") {
                let op = rest.split(',').next().unwrap().to_owned();
                out.last_mut().unwrap().push(op);
            }
        }
        out
    }

    #[test]
    fn expansion_order_prints_the_same_successors_in_generation_order() {
        let nums = [22, 26, 31, 53];
        for seed in 0..20u64 {
            let mut a = PyRandom::new(seed);
            let mut b = PyRandom::new(seed);
            let shuffled = sosp(27, &nums, 4, 0.5, SuccessorOrder::Shuffled, &mut a);
            let ordered = sosp(27, &nums, 4, 0.5, SuccessorOrder::Expansion, &mut b);
            let (first_s, first_o) = (
                &expansions(&shuffled.search_path)[0],
                &expansions(&ordered.search_path)[0],
            );
            // The same kept successors of the root (four numbers: none is terminal)...
            let mut s = first_s.clone();
            let mut o = first_o.clone();
            s.sort();
            o.sort();
            assert_eq!(s, o, "seed {seed}");
            assert_eq!(s.len(), 4);
            // ...printed in generation order: pairs (0,1), (0,2), …, then + * - /.
            let mut all = [Op::ZERO; 4];
            let mut generation = Vec::new();
            for i in 0..nums.len() {
                for j in i + 1..nums.len() {
                    let n = combine(nums[i], nums[j], &mut all);
                    for op in &all[..n] {
                        let mut text = String::new();
                        op.write(&mut text);
                        generation.push(text);
                    }
                }
            }
            let positions: Vec<usize> = first_o
                .iter()
                .map(|op| generation.iter().position(|g| g == op).unwrap())
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "seed {seed}: {first_o:?}"
            );
        }
    }
}
