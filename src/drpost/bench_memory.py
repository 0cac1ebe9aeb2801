"""Peak memory of one training step, for ``drpost bench`` (:mod:`drpost.bench`).

On CPU the RSS peaks of several variants are not separable in one process (the allocator keeps freed
pages), so each variant is measured in a fresh process (:func:`memory_in_subprocesses`: a warm-up step,
the kernel's peak-RSS counter reset, one measured step); :class:`PeakRSS` samples the RSS of the running
process instead; on CUDA :class:`PeakCUDA` reads the allocator's peak.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict

import torch


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every ~1 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False


def proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc: blocks at least this large are mmapped and unmapped on free (the default threshold grows up to
# 32 MiB, so freed activation-sized blocks stay in the heap and count in the RSS until reused)
LIVE_MMAP_THRESHOLD = 128 * 1024


def memory_in_subprocesses(cfg, keys: list[str], progress: bool, live: bool = False) -> dict:
    """Peak RSS of one step of every variant, each measured in its own Python process. ``live``: the
    child's allocator returns every block >= 128 KiB to the system when freed, so that its RSS follows
    the live tensors (as CUDA's allocator peak does) rather than the heap's fragmentation."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    out = {}
    for key in tqdm(keys, desc="memory", unit="variant", disable=not progress, dynamic_ncols=True):
        payload = json.dumps({"cfg": asdict(cfg), "key": key})
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(LIVE_MMAP_THRESHOLD)) if live else None
        proc = subprocess.run([sys.executable, "-m", "drpost.bench", "--memory-child"], input=payload,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            out[key] = {"error": f"memory subprocess failed (exit {proc.returncode}): {tail[:200]}"}
            continue
        out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


class PeakCUDA:
    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        return False
