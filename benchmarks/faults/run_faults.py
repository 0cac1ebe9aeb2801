"""Fault injection through the real CLI: kill, corrupt, resume, and compare with an uninterrupted run.

    python benchmarks/faults/run_faults.py                    # every scenario, 3 random kills
    python benchmarks/faults/run_faults.py --scenarios kill-mid-step,corrupt-bitflip --random 0

Every scenario trains ``configs/tiny_test.yaml`` (1-layer SmolLM2, LoRA, CPU) for 6 steps with a
checkpoint every 2 steps (``save_total_limit 2``) and ``train.log_selections true``, through
``drpost train`` in a subprocess (``benchmarks/faults/inject.py``), then:

1. the process is SIGKILLed at a chosen point (mid-step, mid-evaluation, mid-checkpoint write, mid
   checkpoint rotation) or after a random delay; corruption scenarios then flip a byte in, or
   truncate, a file of the newest checkpoint;
2. the harness records the newest checkpoint that is complete (its manifest verifies) at that
   moment: the resume point nothing may be lost before;
3. ``drpost train ... --resume`` continues (or, when no checkpoint was complete yet, the run starts
   over with ``--overwrite``);
4. the final LoRA weights, ``selections.jsonl`` (per step and layer: the chosen samples and a
   digest of every selection mask) and the metrics (training-loss and evaluation histories, final
   perplexity and ROUGE-L) are compared **bit for bit** with an uninterrupted run of the same seed.

Columns: ``lost`` = complete-checkpoint steps the resume did not start from (must be 0),
``redone`` = steps finished before the kill and recomputed after it (the price of the checkpoint
interval, not a loss), ``identical`` = weights / selections / metrics equal to the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
INJECT = Path(__file__).resolve().parent / "inject.py"
CONFIG = ROOT / "configs" / "tiny_test.yaml"
STEPS, SAVE = 6, 2
ARGS = ["--train.steps", str(STEPS), "--train.save_steps", str(SAVE), "--train.save_total_limit", "2",
        "--train.eval_every", "2", "--train.log_selections", "true", "--no-progress"]

# name -> (fault armed in the first process, corruption applied after the kill, what it exercises)
SCENARIOS = {
    "kill-mid-step": ("step:5", None, "SIGKILL inside step 5 (gradients filled, optimizer not stepped)"),
    "kill-during-eval": ("eval:3", None, "SIGKILL half-way through the step-4 evaluation"),
    "kill-writing-checkpoint": ("save-files:2", None, "SIGKILL with checkpoint-4 half written (no RNG/state)"),
    "kill-before-manifest": ("save-manifest:2", None, "SIGKILL with every checkpoint-4 file written, no manifest"),
    "kill-during-rotation": ("rotate:1", None, "SIGKILL while deleting checkpoint-2 after checkpoint-6"),
    "corrupt-bitflip": ("step:5", "flip", "one byte flipped in checkpoint-4's adapter weights"),
    "corrupt-truncate": ("step:5", "truncate", "checkpoint-4's optimizer state truncated to half"),
}
FAST = ("kill-before-manifest", "corrupt-bitflip")      # the subset tests/test_faults.py runs


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


def _cli(fault: str, out: Path, name: str, *extra: str) -> list:
    return [sys.executable, str(INJECT), fault, "--", "train", str(CONFIG), "--output_dir", str(out),
            "--run_name", name, *ARGS, *extra]


def _run(cmd: list, timeout: float = 300, kill_after: float | None = None) -> tuple[int, str, float]:
    """Run ``cmd``; with ``kill_after``, SIGKILL it after that many seconds. (rc, stderr, seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            proc.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{' '.join(cmd[-8:])} did not finish within {timeout} s (a hang?)") from None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        err.seek(0)
        return proc.returncode, err.read(), time.perf_counter() - t0


def _complete_step(run: Path) -> int:
    """Step of the newest checkpoint whose manifest verifies (0: none)."""
    from drpost import checkpoint as ckpt

    for folder in reversed(ckpt.checkpoints(run)):
        if not ckpt.verify(folder):
            return ckpt.step_of(folder)
    return 0


def _corrupt(run: Path, how: str) -> str:
    from drpost import checkpoint as ckpt

    newest = ckpt.checkpoints(run)[-1]
    if how == "flip":
        path = newest / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) - 7] ^= 0x01           # one bit of one weight
        path.write_bytes(bytes(data))
    else:
        path = newest / "optimizer.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"{newest.name}/{path.name}"


def _steps_done(run: Path) -> int:
    path = run / "selections.jsonl"
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        try:
            n = max(n, json.loads(line)["step"])
        except (ValueError, KeyError):
            break
    return n


def outputs(run: Path) -> dict:
    """What must be bit-identical: final adapter tensors, the selection log, the metrics."""
    from safetensors.torch import load_file

    metrics = json.loads((run / "metrics.json").read_text())
    final = {k: v for k, v in metrics["final"].items() if k != "generation_seconds"}
    weights = load_file(str(run / "final" / "adapter_model.safetensors"))
    return {"weights": {k: v.clone() for k, v in weights.items()},
            "selections": (run / "selections.jsonl").read_text(),
            "metrics": {"history": metrics["history"], "final": final, "steps": metrics["steps"]},
            "resumed_from": metrics["resumed_from"]}


def _same(a: dict, b: dict) -> dict:
    import torch

    weights = a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    return {"weights": weights, "selections": a["selections"] == b["selections"],
            "metrics": a["metrics"] == b["metrics"]}


def reference(out: Path) -> tuple[dict, float]:
    rc, err, secs = _run(_cli("none", out, "reference"))
    if rc != 0:
        raise RuntimeError(f"the uninterrupted reference run failed (rc {rc}):\n{err[-3000:]}")
    return outputs(out / "reference"), secs


def scenario(name: str, out: Path, ref: dict, fault: str = "none", corrupt: str | None = None,
             kill_after: float | None = None) -> dict:
    """One kill (+ optional corruption) and resume; a row of the summary table."""
    run = out / name
    rc, err, _ = _run(_cli(fault, out, name), kill_after=kill_after)
    killed = rc == -signal.SIGKILL
    row = {"scenario": name, "killed": killed, "detail": ""}
    if not killed:
        row.update(passed=False, detail=f"the process was not killed (rc {rc}): {err[-500:]}")
        return row
    done = _steps_done(run)
    if corrupt:
        row["detail"] = f"corrupted {_corrupt(run, corrupt)}"
    expected = _complete_step(run)
    if expected:
        rc, err, _ = _run(_cli("none", out, name, "--resume"))
    else:                                      # killed before the first checkpoint: start over
        rc, err, _ = _run(_cli("none", out, name, "--overwrite"))
    if rc != 0:
        row.update(passed=False, detail=f"resume failed (rc {rc}): {err[-800:]}")
        return row
    got = outputs(run)
    from drpost import checkpoint as ckpt

    resumed = ckpt.step_of(got["resumed_from"]) if got["resumed_from"] else 0
    same = _same(got, ref)
    reported = not corrupt or ("skipping checkpoint" in err and corrupt_name(row["detail"]) in err)
    row.update(resumed_from=resumed, lost=expected - resumed, redone=max(0, done - resumed), **same,
               reported=reported)
    row["passed"] = row["lost"] == 0 and all(same.values()) and reported
    if corrupt and not reported:
        row["detail"] += "; the corruption was not reported on stderr"
    return row


def corrupt_name(detail: str) -> str:
    return detail.rsplit("/", 1)[-1]


def table(rows: list) -> str:
    lines = ["| scenario | killed | resumed from step | steps lost | steps redone | weights | selections | "
             "metrics | passed |", "|---|---|---|---|---|---|---|---|---|"]
    yn = {True: "yes", False: "no", None: "-"}
    for r in rows:
        lines.append(f"| {r['scenario']} | {yn[r.get('killed')]} | {r.get('resumed_from', '-')} | "
                     f"{r.get('lost', '-')} | {r.get('redone', '-')} | {yn[r.get('weights')]} | "
                     f"{yn[r.get('selections')]} | {yn[r.get('metrics')]} | {'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def run_all(names: list, n_random: int, seed: int, out: Path, log=print) -> list:
    ref, ref_secs = reference(out)
    log(f"reference: {STEPS} uninterrupted steps in {ref_secs:.1f} s")
    rows = []
    for name in names:
        fault, corrupt, what = SCENARIOS[name]
        rows.append(scenario(name, out, ref, fault=fault, corrupt=corrupt))
        log(f"{name}: {'PASS' if rows[-1]['passed'] else 'FAIL'} ({what}) {rows[-1]['detail']}")
    rng = random.Random(seed)
    for i in range(n_random):
        delay = rng.uniform(0.5 * ref_secs, 0.95 * ref_secs)   # startup takes the first ~40%
        for _ in range(4):     # a run faster than the reference may finish before the kill: kill earlier
            row = scenario(f"kill-random-{i + 1}", out, ref, kill_after=delay)
            if row["killed"] or "was not killed (rc 0)" not in row["detail"]:
                break
            shutil.rmtree(out / f"kill-random-{i + 1}", ignore_errors=True)
            delay *= 0.8
        row["scenario"] = f"kill-random-{i + 1} ({delay:.1f} s)"
        rows.append(row)
        log(f"{row['scenario']}: {'PASS' if row['passed'] else 'FAIL'} {row['detail']}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ", ".join(SCENARIOS))
    ap.add_argument("--random", type=int, default=3, help="SIGKILLs after a random delay (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    ap.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    args = ap.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="drpost-faults-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run_all(names, args.random, args.seed, out)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print()
    print(table(rows))
    print(f"\n{sum(r['passed'] for r in rows)}/{len(rows)} scenarios passed in {time.perf_counter() - t0:.0f} s")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
