"""Crash-safe checkpoints (drpost.checkpoint) and their use by DrPostTrainer (issue 7, part 1).

The process-level scenarios (SIGKILL mid-step / mid-evaluation / mid-write through the CLI) are in
tests/test_faults.py and benchmarks/faults/run_faults.py; here the pieces are checked in-process."""
from __future__ import annotations

import json
import os

import pytest
import torch

from drpost import checkpoint as ckpt


def _folder(root, step, files=None):
    f = root / f"checkpoint-{step}"
    f.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"weights" * 100, "sub/optimizer.pt": b"adam" * 50}).items():
        (f / name).parent.mkdir(parents=True, exist_ok=True)
        (f / name).write_bytes(data)
    ckpt.write_manifest(f, step=step)
    return f


def test_manifest_verifies_and_lists_every_file(tmp_path):
    f = _folder(tmp_path, 3)
    manifest = json.loads((f / ckpt.MANIFEST_NAME).read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {"model.safetensors", "sub/optimizer.pt"}
    assert ckpt.verify(f) == []
    ckpt.check(f)


@pytest.mark.parametrize("damage,message", [
    ("flip", "fails its SHA-256 check"),
    ("truncate", "truncated"),
    ("delete", "is missing"),
    ("no-manifest", "no drpost_manifest.json"),
    ("bad-manifest", "unreadable drpost_manifest.json"),
])
def test_damage_is_detected_and_named(tmp_path, damage, message):
    f = _folder(tmp_path, 2)
    target = f / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        target.unlink()
    elif damage == "no-manifest":
        (f / ckpt.MANIFEST_NAME).unlink()
    else:
        (f / ckpt.MANIFEST_NAME).write_text("{not json")
    problems = ckpt.verify(f)
    assert problems and message in " ".join(problems)
    with pytest.raises(ckpt.CheckpointError, match="is not usable"):
        ckpt.check(f)


def test_last_valid_checkpoint_falls_back_and_reports(tmp_path):
    _folder(tmp_path, 2)
    bad = _folder(tmp_path, 4)
    (bad / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-6").mkdir()                    # an empty folder: no manifest
    (tmp_path / "checkpoint-notanumber").mkdir()
    reports = []
    found = ckpt.last_valid_checkpoint(tmp_path, report=reports.append)
    assert found == tmp_path / "checkpoint-2"
    assert len(reports) == 2 and "checkpoint-6" in reports[0] and "checkpoint-4" in reports[1]
    assert "model.safetensors" in reports[1]
    assert ckpt.last_valid_checkpoint(tmp_path / "missing") is None


def test_publish_and_rotate_never_leave_a_partial_checkpoint(tmp_path):
    for step in (2, 4, 6):
        _folder(tmp_path, step)
    stage = ckpt.staging_dir(tmp_path / "checkpoint-8")
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"new")
    assert ckpt.checkpoints(tmp_path)[-1].name == "checkpoint-6"   # staging folders are invisible
    ckpt.write_manifest(stage, step=8)
    ckpt.publish(stage, tmp_path / "checkpoint-8")
    assert [p.name for p in ckpt.rotate(tmp_path, keep=3)] == ["checkpoint-2"]
    removed = ckpt.rotate(tmp_path, keep=2, protect=tmp_path / "checkpoint-4")   # the best model's folder stays
    assert [p.name for p in removed] == ["checkpoint-6"]
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8"]
    assert all(not ckpt.verify(p) for p in ckpt.checkpoints(tmp_path))
    (tmp_path / ".tmp-checkpoint-10").mkdir()
    (tmp_path / ".trash-checkpoint-4").mkdir()
    ckpt.clear_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8"]


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "metrics.json"
    ckpt.atomic_write_bytes(path, b"old")
    ckpt.atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["metrics.json"]


# ------------------------------------------------------------------------------ with the trainer
def _kw(**extra):
    return {**dict(feasible_set="random", frac=0.5, save_strategy="steps", save_steps=2, max_steps=4,
                   save_total_limit=2, target_batch_size=3), **extra}


def test_trainer_checkpoints_carry_a_manifest_and_rotate_after_publishing(tmp_path):
    from test_trainer import drpost_run

    drpost_run(tmp_path, "run", **_kw(max_steps=6))
    run = tmp_path / "run"
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-4", "checkpoint-6"]
    for p in ckpt.checkpoints(run):
        assert ckpt.verify(p) == []
        files = json.loads((p / ckpt.MANIFEST_NAME).read_text())["files"]
        assert {"drpost_state.pt", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(files)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies before its manifest (here: raises) publishes nothing; resume=True then
    continues from the previous complete checkpoint and ends bit-identical to an uninterrupted run."""
    from test_trainer import assert_params_close, drpost_run, params_of

    full, full_model = drpost_run(tmp_path, "full", **_kw(selection_log=str(tmp_path / "full.jsonl")))
    calls = {"n": 0}
    original = ckpt.write_manifest

    def dies_second_time(folder, step=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        return original(folder, step)

    monkeypatch.setattr(ckpt, "write_manifest", dies_second_time)
    log = tmp_path / "crash.jsonl"
    with pytest.raises(KeyboardInterrupt):
        drpost_run(tmp_path, "crash", **_kw(selection_log=str(log)))
    monkeypatch.setattr(ckpt, "write_manifest", original)
    run = tmp_path / "crash"
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-2"]
    assert (run / ".tmp-checkpoint-4").is_dir()           # the half-written folder stays hidden
    resumed, model = drpost_run(tmp_path, "crash", resume=True, **_kw(selection_log=str(log)))
    assert not (run / ".tmp-checkpoint-4").exists()        # cleaned at the next start
    assert_params_close(params_of(model), params_of(full_model), rtol=0, atol=0)
    assert log.read_text() == (tmp_path / "full.jsonl").read_text()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(len(x["digest"]) == 64 for x in lines)


def test_resume_skips_a_corrupted_checkpoint_and_refuses_it_by_name(tmp_path, capsys):
    from test_trainer import assert_params_close, drpost_run, params_of

    _, full_model = drpost_run(tmp_path, "full", **_kw())
    run = tmp_path / "full"
    weights = run / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-4 is not usable: model\.safetensors fails"):
        drpost_run(tmp_path, "full", resume=str(run / "checkpoint-4"), **_kw())
    _, model = drpost_run(tmp_path, "full", resume=True, **_kw())
    assert "skipping checkpoint" in capsys.readouterr().err
    assert_params_close(params_of(model), params_of(full_model), rtol=0, atol=0)


def test_resume_true_without_any_complete_checkpoint(tmp_path):
    from test_trainer import drpost_run

    (tmp_path / "empty" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint-N"):
        drpost_run(tmp_path, "empty", resume=True, **_kw())
    torch.manual_seed(0)
