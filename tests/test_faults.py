"""The fast subset of the fault-injection harness (benchmarks/faults/run_faults.py) in CI: the real
``drpost train`` CLI is SIGKILLed inside step 5, one bit of its newest checkpoint (checkpoint-4) is
flipped, and ``--resume`` must report the corruption, continue from checkpoint-2 and finish with
weights, selections and metrics bit-identical to an uninterrupted run. The other scenarios (kills
during evaluation, checkpoint writes and rotation, random kills, truncation) run in the harness;
an interrupted checkpoint write is also covered in-process by tests/test_checkpoint.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "faults"))

import run_faults  # noqa: E402


def test_kill_corrupt_and_resume_through_the_cli(tmp_path):
    rows = run_faults.run_all(["corrupt-bitflip"], n_random=0, seed=0, out=tmp_path, log=lambda *_: None)
    table = run_faults.table(rows)
    (row,) = rows
    assert row["killed"], table
    assert row["resumed_from"] == 2 and row["lost"] == 0, table
    assert row["reported"], "the corrupted checkpoint was not reported on stderr"
    assert row["weights"] and row["selections"] and row["metrics"], table
    assert row["passed"] and "PASS" in table
