"""``auto`` by measurement: which exact back-end is fastest for one layer shape on this machine.

The modelled cost (FLOPs + ``BYTE_COST`` per byte of temporaries, :mod:`drpost.scoring.auto`) is a
guess about a machine: on a 2-core CPU it picked ``direct`` where that was the slowest exact
back-end. With ``auto_calibration="measure"`` the first step that meets a (rule type, B, V, S, k,
O, I, dtype, device, target strategy) shape times what each candidate back-end runs for such a
layer on random factors of that shape, through the rule's own methods:

- ``reduced_ghost``: the scores from the dense target (``dense_scores``), the chosen samples'
  weight-gradient GEMM on k rows (``chosen``), and the dense target's build (``target_dense``);
- ``direct``: the materialised per-sample gradients (``per_sample``), their dot with the dense
  target, the chosen sum as a reduction over them, and the same target build;
- ``pairwise_ghost``: the scores from factor inner products (``pairwise_scores``) and the chosen
  GEMM (no dense target).

With the separate target strategy the target build runs once per ``refresh_every`` steps and is
counted at that share. ``pairwise_ghost`` is timed a second time with its input-side Gram already
computed (``REUSED``): layers fed one input tensor (q/k/v, gate/up) compute that Gram once between
them (:class:`drpost.layers.input_products.InputProducts`), so :mod:`drpost.scoring.auto` charges
each of n such layers the reused time plus 1/n of the Gram. Each candidate is timed ``REPS`` times
(after a warm-up call); the median wins. Results are cached in memory and in a JSON file per machine
(``$DRPOST_CALIBRATION_CACHE``, default ``~/.cache/drpost/scoring_calibration.json``; keyed by
host, CPU/GPU, torch version and thread count), so a shape is measured once per machine, and a
resumed run chooses as the first one did. A distributed engine keeps the modelled choice (every
rank must pick the same back-end without a collective at scoring time).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..layers import Factors
from ..layers.input_products import INPUT_PRODUCTS

REPS = 5
REUSED = "pairwise_ghost|input_gram_reused"   # pairwise_ghost with its input-side Gram already computed
_MEMORY: dict[str, dict[str, float]] = {}


def measurable(rule) -> bool:
    """Rules whose kernels :func:`measure` can time: drpost's Linear / Conv1D rules (custom rules
    keep the modelled choice)."""
    from ..layers.linear import LinearRule

    return type(rule).__module__ == LinearRule.__module__ and isinstance(rule, LinearRule)


def cache_path() -> Path:
    env = os.environ.get("DRPOST_CALIBRATION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "drpost" / "scoring_calibration.json"


def machine_key(device: torch.device) -> str:
    return _machine_key(str(device), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _machine_key(device: str, threads: int) -> str:
    """Host, CPU or GPU model, threads and torch version (looked up once per device and thread count:
    the choice is made for every layer of every step)."""
    dev = torch.device(device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.processor() or platform.machine()}-{threads}threads"
    return f"{platform.node()}|{where}|torch{torch.__version__}"


def shape_key(rule, b: int, v: int, s: int, k: int, dtype: torch.dtype, device: torch.device,
              target_share: float) -> str:
    o, i = rule.out_features, rule.in_features
    bias = int(getattr(rule, "bias", None) is not None)
    return (f"{machine_key(device)}|{type(rule).__name__}|B{b}V{v}S{s}k{k}|O{o}I{i}b{bias}|{dtype}|{device.type}"
            f"|target{target_share:g}")


def _load_file() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, timings: dict[str, float]) -> None:
    """Add one shape's timings to the file (atomic replace; a read-only home only loses the cache)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_file()
        data[key] = timings
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _median_seconds(fn, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()   # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernels(rule, name: str, gen: Factors, tgt: Factors, k: int, target_share: float):
    """The work one back-end does for this layer in one step (random factors; results discarded)."""
    idx = torch.arange(k, device=gen.d.device)

    def build():
        return rule.target_dense(tgt)

    dense = build()
    if name == "reduced_ghost":
        def run():
            rule.dense_scores(gen, dense, False)
            rule.chosen(gen.rows(idx), None)
    elif name == "direct":
        def run():
            ps = rule.per_sample(gen)
            sum((g.flatten(1) * dense[p].flatten().to(g.dtype)).sum(1) for p, g in ps.items() if p in dense)
            for g in ps.values():
                g[idx].sum(0)
    elif name in ("pairwise_ghost", REUSED):
        def run():
            rule.pairwise_scores(gen, tgt, False)
            rule.chosen(gen.rows(idx), None)
    else:
        raise ValueError(name)
    return run, (build if name not in ("pairwise_ghost", REUSED) else None)


def measure(rule, candidates: list[str], b: int, v: int, s: int, k: int, dtype: torch.dtype,
            device: torch.device, target_share: float) -> dict[str, float]:
    """Seconds per step of each candidate back-end for this layer shape (cached per machine), with
    ``REUSED`` beside ``pairwise_ghost``."""
    key = shape_key(rule, b, v, s, k, dtype, device, target_share)
    wanted = list(candidates) + ([REUSED] if "pairwise_ghost" in candidates else [])
    have = _MEMORY.get(key)
    if have is None:
        have = _load_file().get(key)
    if have is not None and all(c in have for c in wanted):
        _MEMORY[key] = have
        return {c: have[c] for c in wanted}
    gen_rng = torch.Generator(device=device).manual_seed(0)
    o, i = rule.out_features, rule.in_features

    def factors(n):
        n = max(n, 1)
        a = torch.randn(n, s, i, generator=gen_rng, device=device, dtype=dtype)
        d = torch.randn(n, s, o, generator=gen_rng, device=device, dtype=dtype)
        return Factors(a, d)

    gen, tgt = factors(b), factors(v)
    timings = {}
    with torch.no_grad(), INPUT_PRODUCTS.disabled():   # each candidate timed on its own work
        for name in candidates:
            run, build = _kernels(rule, name, gen, tgt, min(k, gen.n), target_share)
            seconds = _median_seconds(run, device)
            if build is not None and target_share > 0:
                seconds += target_share * _median_seconds(build, device)
            timings[name] = seconds
    if REUSED in wanted:
        run, _ = _kernels(rule, REUSED, gen, tgt, min(k, gen.n), target_share)
        with torch.no_grad():   # input Grams kept: the warm-up call computes it, the timed calls reuse it
            timings[REUSED] = _median_seconds(run, device)
        INPUT_PRODUCTS.clear()     # its entry holds the random factors
    _MEMORY[key] = dict(have or {}) | timings
    _store(key, _MEMORY[key])
    return timings


def clear_memory() -> None:
    """Forget the in-memory results (the file cache stays)."""
    _MEMORY.clear()
