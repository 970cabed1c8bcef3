#!/usr/bin/env python3
"""Where an APR evaluation's failures come from: `python3 scripts/apr_failures.py RECORDS.jsonl`
(the `records.jsonl` that `apr eval --mode apr` or `apr pipeline` writes).

Checks the parent's first call (its root expansion) line by line: an `Exploring Operation`
whose operands are not in the prompt's numbers or whose arithmetic is wrong is "wrong"; one
that repeats an earlier operation is "repeated". For children it counts prompts that can
still reach the target and children that claim the goal. Standard library only.
"""
import itertools
import json
import re
import sys

EXPLORING = re.compile(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+)")
STATE = re.compile(r"Current State: (\d+):\[([\d, ]*)\]")


def results(a, b):
    big, small = max(a, b), min(a, b)
    out = [a + b, a * b, big - small]
    if small and big % small == 0:
        out.append(big // small)
    return out


def solvable(nums, target):
    if len(nums) == 1:
        return nums[0] == target
    for i, j in itertools.combinations(range(len(nums)), 2):
        rest = [n for k, n in enumerate(nums) if k not in (i, j)]
        if any(solvable(rest + [r], target) for r in results(nums[i], nums[j])):
            return True
    return False


def check_op(a, op, b, r, nums):
    """Whether `a op b = r` is exact and uses two of `nums`."""
    pool = list(nums)
    for n in (a, b):
        if n not in pool:
            return False
        pool.remove(n)
    exact = {"+": a + b, "*": a * b, "-": a - b, "/": a // b if b and a % b == 0 else None}
    return exact[op] == r


def main(path):
    totals = dict.fromkeys(
        ["problems", "solved", "root_ops", "root_wrong", "root_repeated",
         "children", "children_solvable", "children_claiming_goal",
         "problems_with_a_solvable_child"], 0)
    for line in open(path):
        record = json.loads(line)
        nums, segments = record["nums"], record["result"]["segments"]
        totals["problems"] += 1
        totals["solved"] += bool(record["correct"])
        root = segments[0]["output"].split("<Calling Sub Searches>")[0]
        seen = set()
        for m in EXPLORING.finditer(root):
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            totals["root_ops"] += 1
            totals["root_wrong"] += not check_op(a, op, b, r, nums)
            totals["root_repeated"] += (a, op, b) in seen
            seen.add((a, op, b))
        any_solvable = False
        for child in (s for s in segments if s["role"] != "parent"):
            totals["children"] += 1
            state = STATE.search(child["prompt"])
            if state and state[2]:
                ok = solvable([int(x) for x in state[2].split(", ")], record["target"])
                totals["children_solvable"] += ok
                any_solvable |= ok
            totals["children_claiming_goal"] += "equal: Goal Reached" in child["output"]
        totals["problems_with_a_solvable_child"] += any_solvable
    for key, value in totals.items():
        base = totals["root_ops"] if key.startswith("root_") and key != "root_ops" else None
        share = f"  ({100 * value / base:.1f}%)" if base else ""
        print(f"{key:32} {value}{share}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: apr_failures.py RECORDS.jsonl")
    main(sys.argv[1])
