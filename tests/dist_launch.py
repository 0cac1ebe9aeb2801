"""Start a test's worker script as WORLD processes (one per rank) and collect their results.

A free TCP port, one subprocess per rank (gloo, 1 thread), a hard timeout so that a hang fails
instead of blocking; each worker writes ``rank<r>.pt`` into ``out``, which is returned per rank."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, out: Path, timeout: float, world: int = 2) -> list:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    logs = [open(out / f"rank{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(out)], stdout=logs[r], stderr=subprocess.STDOUT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    tails = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout} s (a hang?)\n{tails}")
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise AssertionError(f"ranks {bad} failed\n{tails}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# inside a worker, and reading its results

def init_worker(timeout_s: float = 60.0) -> tuple[int, int]:
    """gloo process group from the launcher's environment, 1 thread; (rank, world)."""
    import datetime

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world


class Results(dict):
    """A worker's results by part name; a part that raises records its traceback instead."""

    def __init__(self):
        super().__init__(timing={})

    def part(self, name: str, fn) -> None:
        import traceback

        start = time.perf_counter()
        try:
            self[name] = fn()
        except Exception:           # noqa: BLE001 - the parent reports it
            self[name] = {"error": traceback.format_exc()}
        self["timing"][name] = time.perf_counter() - start


def errors(fn):
    """``"Type: message"`` of what ``fn()`` raised, None if it did not."""
    try:
        fn()
    except Exception as e:          # noqa: BLE001 - the parent checks the type and message
        return f"{type(e).__name__}: {e}"
    return None


def part_of(ranks: list, name: str) -> list:
    """Every rank's result of part ``name``, failing with the rank's traceback if it raised."""
    got = [r[name] for r in ranks]
    for r, g in enumerate(got):
        assert "error" not in g, f"rank {r}:\n{g['error']}"
    return got


def worker_main(worker) -> None:
    """The ``__main__`` of a worker script: ``worker(Path(sys.argv[1]))`` with transformers quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    worker(Path(sys.argv[1]))
    sys.exit(0)
