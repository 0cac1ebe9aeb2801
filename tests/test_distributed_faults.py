"""Distributed faults with 2 gloo ranks (issue 7, part 4): a rank that dies or hangs ends the job
with a clear error within a bounded time, and ranks given different data or options are refused
before the first step.

Each launch starts both ranks as subprocesses of this file (as tests/test_distributed.py does) with
a hard wall-clock limit, so a hang fails the test instead of blocking it. Rank 0 writes what it
saw (the exception, how long it waited) to a JSON file that the test reads."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import models_tiny as mt

WORLD, B, SEQ = 2, 4, 10
LIMIT_S = 90          # per launch: both ranks, imports included


def _engine_steps(rank: int, fault: str) -> dict:
    """Four distributed drpost steps; rank 1 dies (SIGKILL) or hangs at the third. ``fsdp-crash``:
    the model is FSDP2-sharded and rank 1 dies inside the third step's backward."""
    from drpost import DataRegularizer

    model = mt.llama(tied=True, seed=1, num_layers=2)
    if fault.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = {"step": 0}

        def die(module, grad_in, grad_out):
            if rank == 1 and state["step"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        model.model.layers[1].mlp.register_full_backward_hook(die)
    reg = DataRegularizer(model, feasible_set="layerwise", frac=0.5, distributed=True,
                          target_strategy="separate" if fault.startswith("fsdp") else "merged")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(4):
        if fault.startswith("fsdp"):
            state["step"] = step
        elif rank == 1 and step == 2:
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)                          # "hang": never reaches the collective
        t0 = time.monotonic()
        try:
            reg.backward(mt.make_batch(B, SEQ, seed=10 * step + rank), mt.make_batch(2, SEQ, seed=99 + step))
        except Exception as e:              # noqa: BLE001 - reported to the parent
            return {"step": step, "error": type(e).__name__, "message": str(e), "waited_s": time.monotonic() - t0}
        opt.step()
        opt.zero_grad()
    return {"step": 4, "error": None}


def _hf_mismatch(rank: int, out: Path) -> dict:
    """Rank 1 loaded a different general dataset (2 rows more): refused before the first step."""
    from drpost.integrations import DrPostArguments, DrPostTrainer

    def rows(n, seed):
        b = mt.make_batch(n, SEQ, seed)
        return [{k: v[i] for k, v in b.items()} for i in range(n)]

    args = DrPostArguments(output_dir=str(out / "hf"), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                           max_steps=2, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                           target_batch_size=2, n_target=4)
    trainer = DrPostTrainer(model=mt.llama(tied=False), args=args, train_dataset=rows(16 + 2 * rank, 1),
                            target_dataset=rows(8, 2))
    try:
        trainer.train()
    except ValueError as e:
        return {"error": type(e).__name__, "message": str(e), "steps": trainer.state.global_step}
    return {"error": None, "steps": trainer.state.global_step}


def _hf_checkpoint(rank: int, out: Path) -> dict:
    """Both ranks write one staged checkpoint (rank 0 the manifest); every rank's RNG file is in it."""
    from drpost import checkpoint as ckpt
    from drpost.integrations import DrPostArguments, DrPostTrainer

    def rows(n, seed):
        b = mt.make_batch(n, SEQ, seed)
        return [{k: v[i] for k, v in b.items()} for i in range(n)]

    args = DrPostArguments(output_dir=str(out / "ckpt"), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                           max_steps=2, save_strategy="steps", save_steps=2, disable_tqdm=True,
                           dataloader_num_workers=0, target_batch_size=2, n_target=4)
    DrPostTrainer(model=mt.llama(tied=False), args=args, train_dataset=rows(8, 1), target_dataset=rows(8, 2)).train()
    folder = out / "ckpt" / "checkpoint-2"
    files = json.loads((folder / ckpt.MANIFEST_NAME).read_text())["files"] if folder.is_dir() else {}
    return {"problems": ckpt.verify(folder), "files": sorted(files),
            "hidden": sorted(p.name for p in (out / "ckpt").iterdir() if p.name.startswith("."))}


def _worker(out: Path, fault: str) -> None:
    import datetime

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    res = {}
    try:
        if fault == "crash":
            res["mismatch"] = _hf_mismatch(rank, out)
            res["checkpoint"] = _hf_checkpoint(rank, out)
        res["fault"] = _engine_steps(rank, fault)
    except Exception:               # noqa: BLE001
        res["crash"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    os._exit(0)                     # no destroy_process_group: the peer is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, fault: str, timeout_env: str) -> tuple[dict, float]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", DRPOST_COLLECTIVE_TIMEOUT=timeout_env)
    procs = [subprocess.Popen([sys.executable, __file__, str(out), fault], stdout=subprocess.DEVNULL,
                              stderr=open(out / f"rank{r}.log", "w"), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(WORLD)]
    t0 = time.monotonic()
    try:
        procs[0].wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"rank 0 did not finish within {LIMIT_S} s after rank 1's {fault} (a hang):\n"
                             + (out / "rank0.log").read_text()[-2000:]) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    path = out / "rank0.json"
    assert path.is_file(), f"rank 0 wrote no result:\n{(out / 'rank0.log').read_text()[-3000:]}"
    res = json.loads(path.read_text())
    assert "crash" not in res, res["crash"]
    return res, elapsed


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import transformers

    transformers.logging.set_verbosity_error()
    _worker(Path(sys.argv[1]), sys.argv[2])


# ---------------------------------------------------------------------------------------------
# the tests (pytest process)

def test_a_killed_rank_ends_the_job_with_a_clear_error(tmp_path):
    """Also (same launch, before the kill): mismatched datasets refused at start-up, and a staged
    checkpoint written by two ranks."""
    res, _ = launch(tmp_path, "crash", timeout_env="60")
    mismatch = res["mismatch"]
    assert mismatch["error"] == "ValueError" and mismatch["steps"] == 0, mismatch
    assert "len(train_dataset)" in mismatch["message"] and "rank 0=16, rank 1=18" in mismatch["message"]
    saved = res["checkpoint"]
    assert saved["problems"] == [] and saved["hidden"] == [], saved
    assert {"rng_state_0.pth", "rng_state_1.pth", "drpost_state.pt", "optimizer.pt"} <= set(saved["files"]), saved
    fault = res["fault"]
    assert fault["step"] == 2 and fault["error"] == "DistributedFaultError", fault
    assert "rank 0 of 2" in fault["message"] and "crashed, was killed or hangs" in fault["message"]
    assert fault["waited_s"] < 30, fault            # the dropped connection is noticed, not waited out


def test_a_hanging_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    res, _ = launch(tmp_path, "hang", timeout_env="4")
    fault = res["fault"]
    assert fault["step"] == 2 and fault["error"] == "DistributedFaultError", fault
    assert "no answer within 4 s" in fault["message"] and "DRPOST_COLLECTIVE_TIMEOUT" in fault["message"]
    assert 3.5 < fault["waited_s"] < 30, fault


def test_a_rank_killed_inside_an_fsdp2_backward_ends_the_job_with_a_clear_error(tmp_path):
    res, _ = launch(tmp_path, "fsdp-crash", timeout_env="60")
    fault = res["fault"]
    assert fault["step"] == 2 and fault["error"] == "DistributedFaultError", fault
    assert "rank 0 of 2" in fault["message"] and "crashed, was killed or hangs" in fault["message"]
    assert fault["waited_s"] < 30, fault


def test_collective_timeout_setting(monkeypatch):
    import pytest

    from drpost.distributed import DEFAULT_TIMEOUT_S, collective_timeout

    monkeypatch.delenv("DRPOST_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("DRPOST_COLLECTIVE_TIMEOUT", "12.5")
    assert collective_timeout() == 12.5
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv("DRPOST_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="DRPOST_COLLECTIVE_TIMEOUT"):
            collective_timeout()
