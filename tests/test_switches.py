"""benchmarks/switches.py's table on hand-made results: each run's gain over base and over GRPO of the same seed is
paired (per problem), and each set's mean is over its seeds."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import switches  # noqa: E402


def test_gains_are_paired_per_problem_and_against_grpo_of_the_same_seed():
    def result(passes):
        return {"greedy": (sum(passes) / len(passes), 0.0, 1.0), "greedy_passes": passes, "problems": len(passes), "generation_precision": "bf16"}

    run = {"seconds": 120.0, "steps": 3, "batches": 3.0, "flat_group_share": 0.5, "entropy_end": 0.25}
    report = {"base": result([0, 0, 1, 1]), "grpo-1": result([1, 0, 1, 1]), "dapo-1": result([1, 1, 1, 0]),
              "grpo-2": result([1, 1, 1, 1]), "dapo-2": result([1, 1, 1, 1])}  # fmt: skip
    runs = {("grpo", 1): run, ("dapo", 1): run | {"batches": 7.0}, ("grpo", 2): run, ("dapo", 2): run}
    rows = switches.table(runs, report).splitlines()
    dapo_1 = next(row for row in rows if row.startswith("| dapo | 1 |")).split(" | ")
    assert dapo_1[3].startswith("0.250 [")  # over base: (+1 +1 0 -1) / 4
    assert dapo_1[4].startswith("0.000 [")  # over grpo-1 (not grpo-2): (0 +1 0 -1) / 4
    assert dapo_1[5:8] == ["2.0 min", "3", "7"]
    grpo_2 = next(row for row in rows if row.startswith("| grpo | 2 |")).split(" | ")
    assert grpo_2[3].startswith("0.500 [") and grpo_2[4] == ""
    assert "| dapo | +0.375 (+0.250, +0.500) | 2.0 min |" in rows  # the mean over the seeds
