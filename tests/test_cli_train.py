"""`drpost train` / `drpost eval` end to end on configs/tiny_test.yaml (1-layer SmolLM2, LoRA, a few steps)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drpost.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")
QUIET = ["--no-progress"]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run resumed to 4 steps, and an uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", TINY, "--train.steps", "2", "--output_dir", str(out), *QUIET]) == 0
    first = json.loads((out / "tiny_test" / "metrics.json").read_text())
    assert main(["train", TINY, "--train.steps", "4", "--output_dir", str(out), "--resume", *QUIET]) == 0
    assert main(["train", TINY, "--train.steps", "4", "--output_dir", str(out), "--run_name", "straight", *QUIET]) == 0
    return out, first


def test_train_writes_the_run_directory(runs):
    out, first = runs
    run = out / "tiny_test"
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "curves.png", "predictions.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert first["steps"] == 2 and first["resumed_from"] is None
    final = first["final"]
    for key in ("test_loss", "test_ppl", "rougeL"):
        assert _finite(final[key]), key
    assert [e["step"] for e in first["history"]["eval"]] == [0, 2]
    assert all(_finite(h["loss"]) and _finite(h["target_loss"]) for h in first["history"]["train"])
    assert _finite(first["seconds_per_step"]) and first["timed_steps"] == 2
    assert first["data"]["target"] == 4 and first["data"]["test"] == 8
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_ppl" in h for h in lines) and any("loss" in h for h in lines)


def test_resume_continues_without_repeating_or_skipping(runs):
    out, _ = runs
    resumed = json.loads((out / "tiny_test" / "metrics.json").read_text())
    straight = json.loads((out / "straight" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["timed_steps"] == 2
    assert [h["step"] for h in resumed["history"]["train"]] == [1, 2, 3, 4]
    assert [e["step"] for e in resumed["history"]["eval"]] == [0, 2, 4]
    # same data, target batches and updates as the uninterrupted run
    for a, b in zip(resumed["history"]["train"], straight["history"]["train"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["target_loss"] == pytest.approx(b["target_loss"], rel=1e-4)
    assert resumed["final"]["test_ppl"] == pytest.approx(straight["final"]["test_ppl"], rel=1e-4)
    a, b = _adapter(out / "tiny_test"), _adapter(out / "straight")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5 * (1 + b[k].abs().max()), k


def test_eval_rewrites_metrics(runs, capsys):
    out, _ = runs
    run = out / "tiny_test"
    assert main(["eval", str(run), *QUIET]) == 0
    ev = json.loads((run / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert ev["checkpoint"].endswith("final") and ev["n_test"] == 4
    assert ev["test_ppl"] == pytest.approx(metrics["final"]["test_ppl"], rel=1e-3)
    assert _finite(ev["rougeL"]) and len(ev["predictions"]) == 4
    assert main(["eval", str(run), "--checkpoint", "checkpoint-4", "--eval.n_test", "2", "--output",
                 str(run / "eval_ckpt.json"), *QUIET]) == 0
    ev = json.loads((run / "eval_ckpt.json").read_text())
    assert ev["checkpoint"].endswith("checkpoint-4") and ev["n_test"] == 2


def test_user_errors_are_one_line(runs, tmp_path, capsys):
    out, _ = runs
    assert main(["train", TINY, "--output_dir", str(out), *QUIET]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", TINY, "--output_dir", str(tmp_path), "--resume", *QUIET]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", TINY, "--output_dir", str(out), "--resume", "--train.batch_size", "2", *QUIET]) == 2
    assert "train.batch_size changed" in capsys.readouterr().err
    assert main(["train", TINY, "--train.step", "3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert main(["eval", str(out / "tiny_test"), "--train.steps", "3"]) == 2
    assert "only accepts eval.* overrides" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_missing_model_path_through_the_entry_point(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "drpost.cli", "train", TINY, "--model.name", str(tmp_path / "no_such_model"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no_such_model" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_disk_full_while_saving_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import errno

    from drpost.integrations.checkpoints import CrashSafeCheckpoints

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CrashSafeCheckpoints, "_save_checkpoint", full)   # every drpost trainer's
    assert main(["train", TINY, "--train.steps", "2", "--eval.at_start", "false", "--output_dir", str(tmp_path),
                 *QUIET]) == 2
    err = capsys.readouterr().err
    assert "ran out of disk space while saving" in err and "train.save_total_limit" in err and "--resume" in err


def test_train_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m drpost.cli train` with 2 rows per rank trains like one process
    with 4 rows; rank 0 alone writes the run directory (one TensorBoard writer, one metrics.json)."""
    common = ["train", TINY, "--train.steps", "2", "--train.bf16", "false", "--train.save_steps", "0",
              "--train.eval_every", "0", "--eval.n_test", "2", "--eval.max_new_tokens", "4", *QUIET]
    assert main(common + ["--train.batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "drpost.cli", *common, "--train.batch_size", "2", "--output_dir", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "tiny_test" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "tiny_test" / "metrics.json").read_text())
    assert two["final"]["test_ppl"] == pytest.approx(one["final"]["test_ppl"], rel=1e-4)
    assert two["final"]["test_ppl"] != pytest.approx(two["start"]["ppl"] if two["start"] else 0.0, rel=1e-6)
    losses = [[h["loss"] for h in m["history"]["train"]] for m in (one, two)]
    assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert len(list((tmp_path / "two" / "tiny_test" / "tensorboard").glob("events.*"))) == 1
    assert proc.stdout.count("drpost train:") == 1  # the banner from rank 0 only


def test_train_fsdp_under_torchrun_matches_one_process_and_resumes(tmp_path):
    """`train.fsdp: true`: the model (LoRA on the 1-layer SmolLM2) is fully_shard-ed over 2 ranks;
    2 steps, a checkpoint, --resume to 4 steps: the same losses and final perplexity as one
    unsharded process with the whole batch."""
    common = ["train", TINY, "--train.bf16", "false", "--train.save_steps", "2", "--train.eval_every", "0",
              "--eval.n_test", "2", "--eval.max_new_tokens", "4", *QUIET]
    assert main(common + ["--train.steps", "4", "--train.batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for steps, extra in (("2", []), ("4", ["--resume"])):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "-m", "drpost.cli", *common, "--train.fsdp", "true", "--train.steps", steps,
                               "--train.batch_size", "2", "--output_dir", str(tmp_path / "two"), *extra],
                              capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "tiny_test" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "tiny_test" / "metrics.json").read_text())
    assert two["resumed_from"] and two["steps"] == 4
    assert two["final"]["test_ppl"] == pytest.approx(one["final"]["test_ppl"], rel=1e-4)
    losses = [[h["loss"] for h in m["history"]["train"]] for m in (one, two)]
    assert losses[1][-2:] == pytest.approx(losses[0][-2:], rel=1e-4)


def test_train_fsdp_needs_several_processes(tmp_path, capsys):
    assert main(["train", TINY, "--train.fsdp", "true", "--train.steps", "1", "--output_dir", str(tmp_path),
                 *QUIET]) == 2
    assert "train.fsdp: true shards the model over several processes" in capsys.readouterr().err
