//! The strict verifier (spec §1.3): final-answer extraction and a multiset replay of the path.

use crate::problem::Problem;

const GOAL: &str = "Goal Reached";

/// The final answer of a trace (the reference's `get_search_result`): the text after the
/// second-to-last `Goal Reached`, i.e. the summary path written after announcing success,
/// trimmed, without the `Goal Reached\n` that precedes it. `None` with fewer than two.
pub fn final_answer(trace: &str) -> Option<&str> {
    let mut last = None;
    let mut second_last = None;
    let mut from = 0;
    while let Some(pos) = trace[from..].find(GOAL) {
        second_last = last;
        last = Some(from + pos);
        // Occurrences may overlap only if the marker overlapped itself; it does not.
        from += pos + 1;
    }
    let start = second_last?;
    let rest = trace[start..].trim();
    // Python's `[13:]`: drop "Goal Reached" and the character after it.
    let cut = rest
        .char_indices()
        .nth(GOAL.len() + 1)
        .map_or(rest.len(), |(i, _)| i);
    Some(&rest[cut..])
}

/// Does `answer` reach `target` from `nums` (`check_solution`, strict)?
///
/// Every `Exploring Operation: X?Y=Z, Resulting Numbers: [..]` line must remove X and Y from the
/// current multiset, compute Z exactly (division only when exact), and state the resulting
/// multiset; the first line containing `Goal Reached` must find exactly `[target]`. A line that
/// mentions `Exploring Operation` but does not parse fails the answer (the reference would skip
/// it). Other lines are ignored, as in the reference.
pub fn check_answer(nums: &[i64], target: i64, answer: &str) -> bool {
    let mut current: Vec<i64> = nums.to_vec();
    for line in answer.lines() {
        let line = line.trim();
        if let Some(pos) = line.find("Exploring Operation:") {
            let Some(step) = parse_exploring(&line[pos + "Exploring Operation:".len()..]) else {
                return false;
            };
            if !apply(&mut current, &step) {
                return false;
            }
        }
        if line.contains(GOAL) {
            return current.len() == 1 && current[0] == target;
        }
    }
    false
}

/// Verifies a whole trace against its problem: extract the final answer, then replay it.
pub fn verify_trace(problem: &Problem, trace: &str) -> bool {
    final_answer(trace).is_some_and(|answer| check_answer(&problem.nums, problem.target, answer))
}

/// The binary reward: 1 when the trace's final answer verifies.
pub fn reward(problem: &Problem, trace: &str) -> f32 {
    if verify_trace(problem, trace) {
        1.0
    } else {
        0.0
    }
}

/// Replays a list of operation strings (`a+b=c`) from `nums`; true when they use every number
/// once and end at `target`.
pub fn replay(nums: &[i64], target: i64, ops: &[String]) -> bool {
    let mut current = nums.to_vec();
    for op in ops {
        let Some(step) = parse_op(op) else {
            return false;
        };
        let mut after = current.clone();
        if !remove_operands(&mut after, &step) {
            return false;
        }
        after.push(step.result);
        current = after;
    }
    current == [target]
}

struct Step {
    a: i64,
    kind: u8,
    b: i64,
    result: i64,
    stated: Option<Vec<i64>>,
}

fn compute(a: i64, kind: u8, b: i64) -> Option<i64> {
    match kind {
        b'+' => a.checked_add(b),
        b'-' => a.checked_sub(b),
        b'*' => a.checked_mul(b),
        b'/' if b != 0 && a % b == 0 => Some(a / b),
        _ => None,
    }
}

fn remove_operands(current: &mut Vec<i64>, step: &Step) -> bool {
    if compute(step.a, step.kind, step.b) != Some(step.result) {
        return false;
    }
    for v in [step.a, step.b] {
        match current.iter().position(|&n| n == v) {
            Some(i) => {
                current.remove(i);
            }
            None => return false,
        }
    }
    true
}

fn apply(current: &mut Vec<i64>, step: &Step) -> bool {
    let mut after = current.clone();
    if !remove_operands(&mut after, step) {
        return false;
    }
    after.push(step.result);
    let Some(stated) = &step.stated else {
        return false;
    };
    let mut a = after.clone();
    let mut b = stated.clone();
    a.sort_unstable();
    b.sort_unstable();
    if a != b {
        return false;
    }
    *current = stated.clone();
    true
}

/// Parses `digits`, returning the value and the rest.
fn number(s: &str) -> Option<(i64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// `X?Y=Z` (no spaces).
fn parse_op_prefix(s: &str) -> Option<(i64, u8, i64, i64, &str)> {
    let (a, rest) = number(s)?;
    let kind = *rest.as_bytes().first()?;
    if !matches!(kind, b'+' | b'-' | b'*' | b'/') {
        return None;
    }
    let (b, rest) = number(&rest[1..])?;
    let rest = rest.strip_prefix('=')?;
    let (result, rest) = number(rest)?;
    Some((a, kind, b, result, rest))
}

fn parse_op(s: &str) -> Option<Step> {
    let (a, kind, b, result, rest) = parse_op_prefix(s.trim())?;
    rest.is_empty().then_some(Step {
        a,
        kind,
        b,
        result,
        stated: None,
    })
}

/// ` X?Y=Z, Resulting Numbers: [n, ...]`
fn parse_exploring(s: &str) -> Option<Step> {
    let (a, kind, b, result, rest) = parse_op_prefix(s.trim_start())?;
    let rest = rest.strip_prefix(',')?.trim_start();
    let rest = rest.strip_prefix("Resulting Numbers:")?.trim_start();
    let rest = rest.strip_prefix('[')?;
    let inner = &rest[..rest.find(']')?];
    let stated = if inner.trim().is_empty() {
        Vec::new()
    } else {
        inner
            .split(',')
            .map(|n| n.trim().parse::<i64>().ok())
            .collect::<Option<Vec<_>>>()?
    };
    Some(Step {
        a,
        kind,
        b,
        result,
        stated: Some(stated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOLVED: &str = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\nExploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\nGenerated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\nMoving to Node #0,0\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\nExploring Operation: 31/31=1, Resulting Numbers: [26, 1]\nGenerated Node #0,0,0: 27:[26, 1] Operation: 31/31=1\nMoving to Node #0,0,0\nCurrent State: 27:[26, 1], Operations: ['53-22=31', '31/31=1']\nExploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached\n";

    fn trace() -> String {
        format!("...search...\nExploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached\n{SOLVED}")
    }

    #[test]
    fn extracts_the_summary_after_the_second_to_last_goal() {
        let t = trace();
        let answer = final_answer(&t).unwrap();
        assert!(answer.starts_with("Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53]"));
        assert!(answer.ends_with("27,27 equal: Goal Reached"));
        assert_eq!(final_answer("27,27 equal: Goal Reached\n"), None);
        assert!(check_answer(&[22, 26, 31, 53], 27, answer));
    }

    #[test]
    fn rejects_wrong_arithmetic_reuse_and_bad_lists() {
        let nums = [22, 26, 31, 53];
        let cases = [
            SOLVED.replace("26+1=27", "26+2=27"), // arithmetic
            SOLVED.replace(
                "31/31=1, Resulting Numbers: [26, 1]",
                "31/31=1, Resulting Numbers: [26, 2]",
            ), // stated list
            SOLVED.replace(
                "53-22=31, Resulting Numbers: [26, 31, 31]",
                "53-22=31, Resulting Numbers: [26, 31]",
            ),
            SOLVED.replace("26+1=27", "27+0=27"), // operand not available
            SOLVED.replace("27,27 equal: Goal Reached\n", ""), // no goal
            SOLVED.replace("53-22=31, Resulting", "53-22=31 Resulting"), // malformed line
        ];
        assert!(check_answer(&nums, 27, SOLVED));
        for (i, case) in cases.iter().enumerate() {
            assert!(!check_answer(&nums, 27, case), "case {i} should fail");
        }
        assert!(!check_answer(&nums, 28, SOLVED), "wrong target");
        assert!(
            !check_answer(
                &[7, 2],
                3,
                "Exploring Operation: 7/2=3, Resulting Numbers: [3]\n3,3 equal: Goal Reached"
            ),
            "inexact division"
        );
        assert!(!check_answer(
            &[2, 7],
            0,
            "Exploring Operation: 2-7=0, Resulting Numbers: [0]\nGoal Reached"
        ));
    }

    #[test]
    fn never_panics_on_odd_text() {
        for text in [
            "",
            "Goal Reached",
            "Exploring Operation:",
            "Exploring Operation: 99999999999999999999+1=2, Resulting Numbers: [",
            "Goal ReachedGoal Reachedé",
        ] {
            let _ = check_answer(&[1, 2], 3, text);
            let _ = final_answer(text);
        }
    }

    #[test]
    fn replay_checks_multisets() {
        let ops: Vec<String> = ["22+31=53", "53/53=1", "26+1=27"]
            .map(String::from)
            .to_vec();
        assert!(replay(&[22, 26, 31, 53], 27, &ops));
        assert!(!replay(&[22, 26, 31, 54], 27, &ops));
    }
}
