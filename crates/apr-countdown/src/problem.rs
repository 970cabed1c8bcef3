//! Countdown problems (spec §1.2): N numbers in `1..max_target`, a target in
//! `10..=max_target`, solvable by construction, each problem drawn from its own seeded stream.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::arith::{combine, push_list, push_quoted_list, Op, MAX_NUMS};
use crate::pyrand::{derive_seed, par_map_seeded, PyRandom};

/// Smallest target.
pub const MIN_TARGET: i64 = 10;
/// Fewest starting numbers supported.
pub const MIN_NUMS: usize = 3;

/// One problem, with the reference's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Starting numbers.
    pub nums: Vec<i64>,
    /// Target.
    pub target: i64,
    /// A solution found by exhaustive search, as operation strings.
    #[serde(default)]
    pub solution: Vec<String>,
    /// The reference's "no-backtrack" path text for that solution.
    #[serde(default)]
    pub optimal_path: String,
    /// Number of starting numbers.
    #[serde(default)]
    pub start_size: usize,
}

/// Why a problem is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProblemError {
    /// Too few or too many numbers.
    #[error("a problem needs {MIN_NUMS} to {MAX_NUMS} numbers, got {0}")]
    Count(usize),
    /// A number is not positive.
    #[error("numbers must be positive integers, got {0}")]
    NonPositive(i64),
    /// The target is not positive.
    #[error("the target must be a positive integer, got {0}")]
    Target(i64),
}

impl Problem {
    /// Checks the shape of a problem read from outside (numbers and target positive, 3–6
    /// numbers). Solvability is not required: evaluation sets may hold unsolvable problems.
    pub fn validate(&self) -> Result<(), ProblemError> {
        if !(MIN_NUMS..=MAX_NUMS).contains(&self.nums.len()) {
            return Err(ProblemError::Count(self.nums.len()));
        }
        if let Some(&n) = self.nums.iter().find(|&&n| n <= 0) {
            return Err(ProblemError::NonPositive(n));
        }
        if self.target <= 0 {
            return Err(ProblemError::Target(self.target));
        }
        Ok(())
    }

    /// A problem with its solution and optimal path filled in, or `None` if unsolvable.
    pub fn solved(nums: Vec<i64>, target: i64) -> Option<Problem> {
        let ops = solve(&nums, target)?;
        let solution: Vec<String> = ops.iter().map(Op::text).collect();
        let optimal_path = optimal_path(target, &nums, &solution);
        Some(Problem {
            start_size: nums.len(),
            nums,
            target,
            solution,
            optimal_path,
        })
    }

    /// The de-duplication key: sorted numbers and target.
    pub fn key(&self) -> (Vec<i64>, i64) {
        let mut nums = self.nums.clone();
        nums.sort_unstable();
        (nums, self.target)
    }
}

/// Can `target` be reached using every number exactly once? Exhaustive over all expression
/// trees by dynamic programming on subsets, several times cheaper than [`solve`]'s DFS, which
/// only runs once a draw is known to be solvable.
pub fn solvable(nums: &[i64], target: i64) -> bool {
    let n = nums.len();
    if n == 0 || n > MAX_NUMS {
        return false;
    }
    let full = (1usize << n) - 1;
    // Reuse the per-subset value lists across calls: allocation dominated this function.
    thread_local! {
        static VALUES: std::cell::RefCell<Vec<Vec<i64>>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    VALUES.with(|cell| {
        let mut values = cell.borrow_mut();
        if values.len() <= full {
            values.resize(full + 1, Vec::new());
        }
        values.iter_mut().for_each(Vec::clear);
        solvable_with(nums, target, &mut values)
    })
}

fn solvable_with(nums: &[i64], target: i64, values: &mut [Vec<i64>]) -> bool {
    let n = nums.len();
    let full = (1usize << n) - 1;
    if n == 1 {
        return nums[0] == target;
    }
    let mut ops = [Op::ZERO; 4];
    // Value lists of every subset of at most n − 2 numbers (and the single numbers), smallest
    // first: masks in increasing order visit every proper submask before its supermask.
    let listed = (n as u32 - 2).max(1);
    for mask in 1..full {
        let size = mask.count_ones();
        if size > listed {
            continue;
        }
        if size == 1 {
            values[mask].push(nums[mask.trailing_zeros() as usize]);
            continue;
        }
        let mut out = std::mem::take(&mut values[mask]);
        for (a, b) in splits(mask) {
            for &x in &values[a] {
                for &y in &values[b] {
                    let count = combine(x, y, &mut ops);
                    out.extend(ops[..count].iter().map(|op| op.result));
                }
            }
        }
        // Duplicates multiply the work of every superset.
        out.sort_unstable();
        out.dedup();
        values[mask] = out;
    }
    // Most draws are solvable: test the cheap splits first and stop at the first hit. Splits
    // into two listed parts need no new values.
    let listed_split =
        |(a, b): &(usize, usize)| a.count_ones() <= listed && b.count_ones() <= listed;
    if splits(full).filter(listed_split).any(|(a, b)| {
        values[a]
            .iter()
            .any(|&x| values[b].iter().any(|&y| reaches(x, y, target)))
    }) {
        return true;
    }
    // One number against the other n − 1, whose values are made and tested as they come,
    // never stored or sorted.
    (0..n).any(|single| {
        let x = nums[single];
        let rest = full ^ (1 << single);
        if rest.count_ones() <= listed {
            return false; // tested above
        }
        splits(rest).any(|(a, b)| {
            values[a].iter().any(|&p| {
                values[b].iter().any(|&q| {
                    let count = combine(p, q, &mut ops);
                    ops[..count].iter().any(|op| reaches(op.result, x, target))
                })
            })
        })
    })
}

/// The splits `(A, B)` of a set mask into two non-empty parts, `A` holding the lowest element so
/// that each split comes once.
fn splits(mask: usize) -> impl Iterator<Item = (usize, usize)> {
    let low = mask & mask.wrapping_neg();
    let mut a = mask;
    std::iter::from_fn(move || loop {
        a = (a - 1) & mask;
        if a == 0 {
            return None;
        }
        if a & low != 0 {
            return Some((a, mask ^ a));
        }
    })
}

/// Whether one of [`combine`]'s results for `(x, y)` is `target`, without building them.
#[inline]
fn reaches(x: i64, y: i64, target: i64) -> bool {
    let (big, small) = if x <= y { (y, x) } else { (x, y) };
    // `big / small == target` exactly ⟺ `big == small · target`: no integer division.
    x + y == target
        || x * y == target
        || big - small == target
        || (small != 0 && big == small * target)
}

/// Exhaustive DFS in the reference's order (pairs `i<j`, `combine` order); the first solution.
pub fn solve(nums: &[i64], target: i64) -> Option<Vec<Op>> {
    if !solvable(nums, target) {
        return None;
    }
    let mut buf = [0i64; MAX_NUMS];
    buf[..nums.len()].copy_from_slice(nums);
    let mut ops = Vec::with_capacity(MAX_NUMS);
    dfs(&buf[..nums.len()], target, &mut ops).then_some(ops)
}

fn dfs(nums: &[i64], target: i64, ops: &mut Vec<Op>) -> bool {
    if nums.len() == 1 {
        return nums[0] == target;
    }
    let mut succ = [Op::ZERO; 4];
    let mut next = [0i64; MAX_NUMS];
    for i in 0..nums.len() {
        for j in i + 1..nums.len() {
            let mut k = 0;
            for (m, &n) in nums.iter().enumerate() {
                if m != i && m != j {
                    next[k] = n;
                    k += 1;
                }
            }
            let count = combine(nums[i], nums[j], &mut succ);
            for op in &succ[..count] {
                next[k] = op.result;
                ops.push(*op);
                if dfs(&next[..=k], target, ops) {
                    return true;
                }
                ops.pop();
            }
        }
    }
    false
}

/// The reference's `convert_to_path`, quirks included (it removes operands by value, so
/// repeated numbers can vanish together; its node numbering starts at 2).
pub fn optimal_path(target: i64, nums: &[i64], solution: &[String]) -> String {
    let mut out = String::with_capacity(256);
    let mut nums: Vec<i64> = nums.to_vec();
    out.push_str("Current State: ");
    out.push_str(&target.to_string());
    out.push(':');
    push_list(&mut out, &nums);
    out.push_str(", Operations: []\n");
    let mut node_index = 1;
    let mut explored: Vec<&str> = Vec::new();
    for op in solution {
        let Some((lhs, _)) = op.split_once('=') else {
            continue;
        };
        let parsed = ['+', '-', '*', '/'].iter().find_map(|&sym| {
            let (a, b) = lhs.split_once(sym)?;
            Some((sym, a.parse::<i64>().ok()?, b.parse::<i64>().ok()?))
        });
        let Some((sym, a, b)) = parsed else { continue };
        let result = match sym {
            '+' => a + b,
            '-' => a - b,
            '*' => a * b,
            _ if b != 0 => a / b,
            _ => continue,
        };
        nums = nums
            .iter()
            .copied()
            .filter(|&n| n != a && n != b)
            .chain([result])
            .collect();
        out.push_str("Exploring Operation: ");
        out.push_str(op);
        out.push_str(", Resulting Numbers: ");
        push_list(&mut out, &nums);
        out.push('\n');
        if nums.len() == 1 {
            out.push_str(&format!("{},{} equal: Goal Reached\n", nums[0], target));
        } else {
            node_index += 1;
            out.push_str(&format!("Generated Node #{node_index}: "));
            push_list(&mut out, &nums);
            out.push_str(&format!(" from Operation: {op}\n"));
            explored.push(op);
            out.push_str(&format!("Current State: {target}:"));
            push_list(&mut out, &nums);
            out.push_str(", Operations: ");
            push_quoted_list(&mut out, &explored, |out, e| out.push_str(e));
            out.push('\n');
        }
    }
    out
}

/// How to draw problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemSpec {
    /// Starting numbers per problem (3–6).
    pub numbers: usize,
    /// Largest target; inputs are drawn from `1..max_target`.
    pub max_target: i64,
}

impl Default for ProblemSpec {
    fn default() -> Self {
        ProblemSpec {
            numbers: 4,
            max_target: 100,
        }
    }
}

impl ProblemSpec {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_NUMS..=MAX_NUMS).contains(&self.numbers) {
            return Err(format!(
                "--numbers must be between {MIN_NUMS} and {MAX_NUMS}, got {}",
                self.numbers
            ));
        }
        if self.max_target < MIN_TARGET {
            return Err(format!(
                "--max-target must be at least {MIN_TARGET}, got {}",
                self.max_target
            ));
        }
        Ok(())
    }

    /// Draws problem `index` of the stream `seed`: the same problem whatever the thread count.
    /// `stream` separates splits (train, validation) drawn from the same seed.
    pub fn draw(&self, seed: u64, stream: u64, index: u64) -> Problem {
        let mut rng = PyRandom::new(derive_seed(seed, stream, index));
        self.draw_with(&mut rng)
    }

    /// Draws from `rng` until a draw is solvable (what [`ProblemSpec::draw`] does with its
    /// stream).
    pub fn draw_with(&self, rng: &mut PyRandom) -> Problem {
        let span = (self.max_target - MIN_TARGET + 1) as usize;
        let target = MIN_TARGET + rng.choice_index(span) as i64;
        loop {
            let nums: Vec<i64> = (0..self.numbers)
                .map(|_| rng.randint(1, (self.max_target - 1) as u32) as i64)
                .collect();
            if let Some(problem) = Problem::solved(nums, target) {
                return problem;
            }
        }
    }

    /// `count` problems, drawn in parallel; problems whose key is in `exclude` are redrawn from
    /// the same stream until they are not.
    pub fn generate(
        &self,
        count: usize,
        seed: u64,
        stream: u64,
        exclude: &HashSet<(Vec<i64>, i64)>,
    ) -> Vec<Problem> {
        self.generate_range(0..count, seed, stream, exclude)
    }

    /// Problems `range` of what [`ProblemSpec::generate`] draws (each problem depends only on
    /// its index), so that a large count can be generated and written chunk by chunk.
    pub fn generate_range(
        &self,
        range: std::ops::Range<usize>,
        seed: u64,
        stream: u64,
        exclude: &HashSet<(Vec<i64>, i64)>,
    ) -> Vec<Problem> {
        let start = range.start;
        par_map_seeded(
            range.len(),
            |i| derive_seed(seed, stream, start as u64 + i),
            |_, rng| loop {
                let p = self.draw_with(rng);
                if exclude.is_empty() || !exclude.contains(&p.key()) {
                    return p;
                }
            },
        )
    }
}

/// Stream ids that keep splits drawn from one seed independent.
pub mod streams {
    /// Training problems.
    pub const TRAIN: u64 = 1;
    /// Validation / test problems.
    pub const VAL: u64 = 2;
    /// Solver randomness (beam sizes, shuffles, spawn decisions).
    pub const SOLVER: u64 = 3;
}

/// Draws a training split and a validation split that shares no (sorted numbers, target) key
/// with it.
pub fn train_val_split(
    spec: &ProblemSpec,
    train: usize,
    val: usize,
    seed: u64,
) -> (Vec<Problem>, Vec<Problem>) {
    let train_set = spec.generate(train, seed, streams::TRAIN, &HashSet::new());
    let keys: HashSet<_> = train_set.iter().map(Problem::key).collect();
    let val_set = spec.generate(val, seed, streams::VAL, &keys);
    (train_set, val_set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solution_and_optimal_path_match_the_reference() {
        // CountDown().search([22, 26, 31, 53], 27) and convert_to_path, run with CPython.
        let p = Problem::solved(vec![22, 26, 31, 53], 27).unwrap();
        assert_eq!(p.solution, ["22+31=53", "53/53=1", "26+1=27"]);
        assert_eq!(
            p.optimal_path,
            "Current State: 27:[22, 26, 31, 53], Operations: []\nExploring Operation: 22+31=53, Resulting Numbers: [26, 53, 53]\nGenerated Node #2: [26, 53, 53] from Operation: 22+31=53\nCurrent State: 27:[26, 53, 53], Operations: ['22+31=53']\nExploring Operation: 53/53=1, Resulting Numbers: [26, 1]\nGenerated Node #3: [26, 1] from Operation: 53/53=1\nCurrent State: 27:[26, 1], Operations: ['22+31=53', '53/53=1']\nExploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached\n"
        );
        assert_eq!(solve(&[5, 5, 5, 3], 24), None);
        assert!(crate::verify::replay(&p.nums, p.target, &p.solution));
    }

    #[test]
    fn generation_is_seeded_per_problem() {
        let spec = ProblemSpec::default();
        let a = spec.generate(50, 7, streams::TRAIN, &HashSet::new());
        let b: Vec<Problem> = (0..50).map(|i| spec.draw(7, streams::TRAIN, i)).collect();
        assert_eq!(a, b);
        for p in &a {
            assert_eq!(p.nums.len(), 4);
            assert!(p.nums.iter().all(|&n| (1..100).contains(&n)));
            assert!((10..=100).contains(&p.target));
            assert!(solve(&p.nums, p.target).is_some());
        }
    }

    #[test]
    fn subset_dp_agrees_with_the_dfs() {
        let mut rng = PyRandom::new(5);
        let mut outcomes = [0usize; 2];
        for _ in 0..3000 {
            // 2 to 5 numbers: every branch of the early exits (listed splits, one number
            // against the rest) is taken.
            let n = 2 + rng.below(4) as usize;
            let nums: Vec<i64> = (0..n).map(|_| rng.randint(1, 30) as i64).collect();
            let target = rng.randint(1, 60) as i64;
            let mut buf = Vec::new();
            let by_dfs = dfs(&nums, target, &mut buf);
            assert_eq!(solvable(&nums, target), by_dfs, "{nums:?} -> {target}");
            outcomes[by_dfs as usize] += 1;
        }
        assert!(outcomes.iter().all(|&k| k > 300), "{outcomes:?}");
    }

    #[test]
    fn validation_split_shares_no_key_with_train() {
        let spec = ProblemSpec {
            numbers: 3,
            max_target: 12,
        };
        // A tiny space forces collisions, so the redraw path is exercised.
        let (train, val) = train_val_split(&spec, 200, 30, 1);
        let keys: HashSet<_> = train.iter().map(Problem::key).collect();
        assert!(val.iter().all(|p| !keys.contains(&p.key())));
    }
}
