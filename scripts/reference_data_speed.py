"""Times the reference's Python data generation on one core, to compare with
`apr --threads 1 data stats --generate N` on the same machine at the same time.

Usage: python scripts/reference_data_speed.py REFERENCE_CHECKOUT [N]
(REFERENCE_CHECKOUT is a clone of the APR reference repository, the directory holding `src/`;
it needs `tqdm` and `numpy`). Times `generate_problem` (4 numbers, targets 10-100) and the APR
solver `apr()` with the reference's beam draws; prints problems/s, traces/s and their
combination.
"""
import random
import sys
import time
import types

root = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
sys.path[:0] = [root, root + "/src"]
from src.data.generate_problems import generate_problem  # noqa: E402
from src.data.search import apr, mult_heuristic  # noqa: E402

args = types.SimpleNamespace(min_range=4, start_range=4, max_target=100)
random.seed(42)
start = time.perf_counter()
problems = [generate_problem(args, list(range(10, 101))) for _ in range(n)]
problem_s = time.perf_counter() - start
start = time.perf_counter()
for p in problems:
    beam = random.randint(1, 10)
    sub = random.randint(beam, 15)
    apr(p["target"], p["nums"], beam, sub_call_beam_size=sub, promising_threshold=0.9,
        heuristic=mult_heuristic)
trace_s = time.perf_counter() - start
print(f"{n / problem_s:.0f} problems/s, {n / trace_s:.0f} APR traces/s, "
      f"{n / (problem_s + trace_s):.0f} problems+traces/s")
