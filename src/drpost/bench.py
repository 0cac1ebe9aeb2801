"""``drpost bench``: the cost of a drpost step against a plain training step, measured.

For one model and one shape (general batch ``B`` x ``T`` tokens, ``V`` target rows, dtype,
device) it times, **alternating in one process** so that machine drift hits every variant alike:

- ``plain``: forward, ``loss.backward()``, AdamW step (token-mean loss over the general batch);
- ``<feasible set>:<scoring>`` for every requested pair: ``reg.backward(general, target)`` with
  the merged target strategy, then the same AdamW step;
- the naive alternatives (``--naive``): ``naive:vmap`` (per-sample gradients of every trainable
  parameter with ``torch.func.vmap(grad(...))``, per-layer dot products with the target gradient,
  per-layer top-k, chosen sum) and ``naive:two_pass`` (GREATS-style: a first forward/backward that
  scores and picks a global subset - drpost's one-pass global step stands in for it - then a second
  forward/backward on the chosen rows only).

Each variant gets ``warmup`` untimed and ``reps`` timed steps; the report gives the median step
time, the ratio of medians to ``plain``, the median and interquartile range of the *pair ratios*
(step i of the variant over plain step i of the same repetition) for wall time and for process CPU
time (:mod:`drpost.bench_stats`; run with ``OMP_WAIT_POLICY=PASSIVE``, as ``./run.sh bench`` does,
for CPU time to mean work done), which variants it can rank (disjoint IQRs) and which it cannot, the peak memory of a step and its ratio to ``plain`` (on
CPU measured in a fresh process per variant: a warm-up step, the kernel's peak-RSS counter reset,
one measured step; on CUDA the allocator's peak), and, from
``breakdown_reps`` extra steps with a :class:`~drpost.profiling.PhaseTimer`, the time per phase:
forward, backward (activation gradients and autograd: everything in the backward pass that is not
drpost's own work), scoring, selection, chosen weight gradient, assembly (``.grad`` writing),
norm rules, optimizer, and other (the step's time outside every named phase: finalize's division
and ``.grad`` writes, batch merging, zero_grad). For ``plain`` the backward is split into
activation backward and weight gradient by timing a backward with every weight frozen. Nothing
here asserts a time: the numbers are for reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from drpost import bench_stats
from drpost.batch import IGNORE_INDEX, causal_lm_token_losses
from drpost.bench_memory import PeakCUDA, PeakRSS, memory_in_subprocesses, proc_status_kb, reset_peak_rss
from drpost.bench_report import format_report, write_report
from drpost.engine.options import GLOBAL_MEMORY, DrPostOptions, add_arguments, from_arguments, help_meta
from drpost.precision import native_bf16, warn_if_slow_bf16
from drpost.profiling import PhaseTimer

__all__ = ["BenchConfig", "run_bench", "format_report", "write_report", "add_bench_arguments",
           "bench_config_from_arguments", "DEFAULT_CONFIGS"]

DEFAULT_CONFIGS = ("layerwise:auto", "layerwise:sketch", "layerwise:pairwise_ghost", "layerwise:reduced_ghost",
                   "layerwise:direct", "global:auto", "rowwise:auto", "filter:auto")
MEMORY_MODES = ("auto", "subprocess", "live", "inprocess", "off")
# the variants' own: every other DrPostOptions knob applies to every drpost variant
PER_VARIANT = ("feasible_set", "scoring")


@dataclass
class BenchConfig(DrPostOptions):
    """The benchmark's shape and schedule, plus the engine's options (:class:`drpost.DrPostOptions`: frac,
    sketch, seed, target_strategy, refresh_every, ...) shared by every variant; each variant's feasible set
    and scoring back-end come from ``configs`` (``FEASIBLE_SET:SCORING``)."""
    model: str = field(default="smollm2", metadata=help_meta("'smollm2' (embedded) or a local HF model directory"))
    num_layers: Optional[int] = field(default=None, metadata=help_meta("keep the first N decoder layers (None: all)"))
    batch: int = field(default=8, metadata=help_meta("general rows B"))
    seq: int = field(default=128, metadata=help_meta("tokens per row T"))
    target: int = field(default=1, metadata=help_meta("target rows V"))
    dtype: str = field(default="fp32", metadata=help_meta("fp32, or bf16 autocast (fp32 weights)", ("fp32", "bf16")))
    device: str = field(default="cpu", metadata=help_meta("cpu or cuda[:N]"))
    reps: int = field(default=10, metadata=help_meta("timed steps per variant (= pairs with the plain step)"))
    warmup: int = field(default=1, metadata=help_meta("untimed steps per variant first"))
    breakdown_reps: int = field(default=1, metadata=help_meta("extra steps timed per phase (0: no breakdown)"))
    configs: list = field(default_factory=lambda: list(DEFAULT_CONFIGS), metadata=help_meta(
        "FEASIBLE_SET:SCORING[:GLOBAL_MEMORY],... to time (e.g. global:auto:recompute)"))
    naive: bool = field(default=True, metadata=help_meta("also time the naive vmap and two-pass alternatives"))
    freeze_embeddings: bool = field(default=False, metadata=help_meta("freeze the (tied) embedding"))
    gradient_checkpointing: bool = field(default=False, metadata=help_meta(
        "Hugging Face activation checkpointing of every decoder layer (use_reentrant=False) for every variant"))
    threads: Optional[int] = field(default=None, metadata=help_meta("torch.set_num_threads (None: leave as is)"))
    memory: str = field(default="auto", metadata=help_meta(
        "peak memory: auto = a fresh process per variant on CPU (one warm-up + one measured step; RSS peaks are "
        "not separable in one process), the allocator peak on CUDA; live = the same, with glibc returning every "
        "block >= 128 KiB to the system when freed (MALLOC_MMAP_THRESHOLD_), so that the RSS follows the live "
        "tensors rather than the heap's fragmentation", MEMORY_MODES))

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """The engine's checks, then the benchmark's (run at construction)."""
        from drpost import feasible as fs
        from drpost.scoring import BACKENDS

        self.check_options()
        for name, v, lo in (("batch", self.batch, 1), ("seq", self.seq, 4), ("target", self.target, 1),
                            ("reps", self.reps, 1), ("warmup", self.warmup, 0), ("breakdown_reps", self.breakdown_reps, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"bench: {name} must be an integer >= {lo}, got {v!r}")
        for name, choices in (("memory", MEMORY_MODES), ("dtype", ("fp32", "bf16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"bench: {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("bench: device cuda requested but torch.cuda.is_available() is False")
        for c in self.configs:     # each variant's feasible set and scoring: the engine's own checks
            try:
                dataclasses.replace(self.engine_options(), **variant_options(c))
            except ValueError:
                raise ValueError(f"bench: config {c!r} must be FEASIBLE_SET:SCORING[:GLOBAL_MEMORY] with a feasible "
                                 f"set in {', '.join(fs.FEASIBLE_SETS)}, scoring in {', '.join(BACKENDS)} and "
                                 f"global memory in {', '.join(GLOBAL_MEMORY)}") from None


def variant_options(config: str) -> dict:
    """The engine options of one ``configs`` entry, FEASIBLE_SET:SCORING[:GLOBAL_MEMORY]."""
    parts = config.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(config)
    return dict(zip(("feasible_set", "scoring", "global_memory"), parts))


def _comma_list(text: str) -> list:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``drpost bench``'s flags: one per field of :class:`BenchConfig` (its own and the engine's options,
    help and choices from the fields; ``--configs`` takes a comma list), plus ``--out``/``--no-progress``."""
    add_arguments(parser, BenchConfig, exclude=PER_VARIANT + ("configs",))
    f = {f.name: f for f in dataclasses.fields(BenchConfig)}["configs"]
    parser.add_argument("--configs", type=_comma_list, default=",".join(f.default_factory()),
                        help=f.metadata["help"] + " (default %(default)s)")
    parser.add_argument("--out", default="runs/bench", help="directory of the Markdown and JSON reports")
    parser.add_argument("--no-progress", action="store_true")


def bench_config_from_arguments(ns: argparse.Namespace) -> BenchConfig:
    return from_arguments(ns, BenchConfig)


# ------------------------------------------------------------------------------------ memory


def _memory_child(cfg: BenchConfig, key: str) -> dict:
    """In a fresh process: one warm-up step of ``key``, reset the peak RSS, one measured step.

    A fresh process per variant is needed on CPU: the allocator keeps freed pages, so in one process
    the RSS peak of every variant after the first is the maximum over all earlier ones."""
    import gc

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bench = _Bench(cfg)
    step = _variant(bench, key)
    bench.activate(key)
    step()  # warm-up: optimizer state allocated, lazy buffers built
    gc.collect()
    before = proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    step()
    peak = proc_status_kb("VmHWM")
    if peak is None:  # not Linux: the process's lifetime peak
        import resource

        peak, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    return {"peak_kb": peak, "before_kb": before, "reset": reset,
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


# ------------------------------------------------------------------------------------ steps
def _batch(vocab: int, n: int, t: int, gen: torch.Generator, device) -> dict:
    """Exactly-T-token rows (no padding); the first quarter of each row is an unsupervised prompt."""
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    labels = ids.clone()
    labels[:, : t // 4] = IGNORE_INDEX
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                          "labels": labels}.items()}


class _Bench:
    def __init__(self, cfg: BenchConfig):
        from drpost.models import enable_activation_checkpointing, load_model

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        warn_if_slow_bf16(cfg.dtype == "bf16", "Time with --dtype fp32 (the report marks the dtype).", self.device.type)
        model, _ = load_model(cfg.model, num_layers=cfg.num_layers)
        self.model = model.to(self.device)
        self.model.train()
        if cfg.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # lr tiny but non-zero: AdamW does its full work without moving the model far
        self.opt = torch.optim.AdamW(self.params, lr=1e-7)
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab = self.model.config.vocab_size
        self.general = _batch(vocab, cfg.batch, cfg.seq, gen, self.device)
        self.target = _batch(vocab, cfg.target, cfg.seq, gen, self.device)
        self.regs: dict = {}
        self.backends: dict = {}
        self.backend_reasons: dict = {}   # {config: {layer: why its back-end (auto: measured / modelled)}}
        self.target_pass: bool | None = None   # last drpost step forwarded target rows (merged, or a capture)?

    def autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _optimizer_step(self, timer: PhaseTimer | None):
        with (timer.phase("optimizer") if timer else nullcontext()):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # plain: the HF-style token-mean loss of the general batch
    def plain(self, timer: PhaseTimer | None = None):
        b = self.general
        with self.autocast():
            with (timer.phase("forward") if timer else nullcontext()):
                loss = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            with (timer.phase("backward") if timer else nullcontext()):
                loss.backward()
        self._optimizer_step(timer)

    def activation_backward_only(self) -> float:
        """Seconds of a backward with every weight frozen (activation gradients only)."""
        b = self.general
        flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            with self.autocast():
                emb = self.model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
                loss = self.model(inputs_embeds=emb, attention_mask=b["attention_mask"], labels=b["labels"]).loss
                self.sync()
                t0 = time.perf_counter()
                loss.backward()
                self.sync()
                return time.perf_counter() - t0
        finally:
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)

    def reg(self, key: str):
        from drpost import DataRegularizer

        if key not in self.regs:
            self.regs[key] = DataRegularizer(self.model, self.cfg.engine_options(), **variant_options(key))
            self.regs[key].detach()
        return self.regs[key]

    def activate(self, key: str) -> None:
        """Hooks of the variant about to run attached, every other variant's removed (untimed)."""
        wanted = "global:auto" if key == "naive:two_pass" else key
        for k, reg in self.regs.items():
            if k != wanted:
                reg.detach()
        if ":" in wanted and not wanted.startswith("naive:"):
            self.reg(wanted).attach()

    def drpost(self, key: str, timer: PhaseTimer | None = None):
        reg = self.reg(key)
        reg.profiler = timer
        with self.autocast():
            reg.backward(self.general, self.target)
        self.target_pass = reg.options.target_strategy == "merged" or reg.steps_since_capture == 1
        self.backends[key] = dict(reg.layer_backends)
        self.backend_reasons[key] = dict(reg.layer_backend_reasons)
        self._optimizer_step(timer)

    # two-pass (GREATS-style): score and pick in pass 1, forward/backward the chosen rows in pass 2
    def two_pass(self, timer: PhaseTimer | None = None):
        reg = self.reg("global:auto")
        with (timer.phase("pass_1") if timer else nullcontext()):
            with self.autocast():
                reg.backward(self.general, self.target)
            mask = reg.last_global_mask
        self.opt.zero_grad(set_to_none=True)
        idx = mask.nonzero().flatten()
        chosen = {k: v[idx] for k, v in self.general.items()}
        with (timer.phase("pass_2") if timer else nullcontext()):
            with self.autocast():
                loss = self.model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"],
                                  labels=chosen["labels"]).loss
                loss.backward()
        self._optimizer_step(timer)

    # naive per-sample gradients with torch.func
    def vmap(self, timer: PhaseTimer | None = None):
        from torch.func import functional_call, grad, vmap

        from drpost import feasible as fs

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        frozen.update(dict(self.model.named_buffers()))

        def row_loss(ps, ids, labels):
            batch = {"input_ids": ids[None], "labels": labels[None]}
            logits = functional_call(self.model, ({**ps, **frozen},), args=(), kwargs={"input_ids": ids[None]}).logits
            losses, mask = causal_lm_token_losses(logits, batch)
            return torch.where(mask, losses, torch.zeros_like(losses)).sum()

        g, t = self.general, self.target
        with self.autocast():
            with (timer.phase("per_sample_grads") if timer else nullcontext()):
                per_sample = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, g["input_ids"], g["labels"])
                target = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, t["input_ids"], t["labels"])
        with (timer.phase("scoring") if timer else nullcontext()):
            modules: dict[str, list[str]] = {}
            for n in names:
                modules.setdefault(n.rsplit(".", 1)[0], []).append(n)
            k = fs.num_selected(g["input_ids"].shape[0], self.cfg.frac)
            tokens = (g["labels"][:, 1:] != IGNORE_INDEX).sum(1).float()
            for mod, ns in modules.items():
                scores = sum((per_sample[n].flatten(1).float() @ target[n].sum(0).flatten().float()) for n in ns)
                idx = torch.topk(scores, k).indices
                denom = tokens[idx].sum()
                for n in ns:
                    p = self.model.get_parameter(n)
                    p.grad = (per_sample[n][idx].sum(0) / denom).to(p.dtype)
        del per_sample, target
        self._optimizer_step(timer)


def _reasons_by_choice(backends: dict, reasons: dict) -> list[dict]:
    """The layers of one config grouped by (back-end, why): [{backend, reason, layers, example}]."""
    groups: dict = {}
    for layer, backend in backends.items():
        g = groups.setdefault((backend, reasons.get(layer, "")), {"backend": backend, "reason": reasons.get(layer, ""),
                                                                   "layers": 0, "example": layer})
        g["layers"] += 1
    return list(groups.values())


def _variant(bench: _Bench, key: str):
    if key == "plain":
        return bench.plain
    if key == "naive:vmap":
        return bench.vmap
    if key == "naive:two_pass":
        return bench.two_pass
    return lambda timer=None: bench.drpost(key, timer)


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the benchmark; returns the report dict (see :func:`format_report`)."""
    from tqdm.auto import tqdm

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    memory = cfg.memory
    if torch.device(cfg.device).type == "cuda" and memory != "off":
        memory = "allocator"  # exact per step on CUDA
    elif memory == "auto":
        memory = "subprocess"
    keys = ["plain"] + list(cfg.configs) + (["naive:vmap", "naive:two_pass"] if cfg.naive else [])
    times = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    peaks = {k: [] for k in keys}
    failed: dict[str, str] = {}
    target_passes: dict[str, int] = {}   # timed steps that forwarded target rows, per drpost variant
    memory_notes = {}
    if memory in ("subprocess", "live"):  # first, while this process holds no model
        for key, m in memory_in_subprocesses(cfg, keys, progress, live=memory == "live").items():
            if "error" in m:
                memory_notes[key] = m["error"]
            else:
                peaks[key] = [m["peak_kb"] * 1024]
                memory_notes[key] = {"rss_before_step_mb": m["before_kb"] / 1024, "peak_reset": m["reset"],
                                     "mmap_threshold": m.get("mmap_threshold")}
    bench = _Bench(cfg)
    total = (cfg.warmup + cfg.reps) * len(keys)
    bar = tqdm(total=total, desc="bench", unit="step", disable=not progress, dynamic_ncols=True)
    for rep in range(cfg.warmup + cfg.reps):
        for key in keys:
            bar.update(1)
            if key in failed:
                continue
            step = _variant(bench, key)
            bench.activate(key)
            meter = {"allocator": lambda: PeakCUDA(bench.device), "inprocess": PeakRSS}.get(memory, nullcontext)()
            bench.target_pass = None     # set by a drpost step
            try:
                bench.sync()
                with meter:
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    bench.sync()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
            except (RuntimeError, NotImplementedError, torch.OutOfMemoryError) as err:
                if not key.startswith("naive:"):
                    raise
                failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                bench.opt.zero_grad(set_to_none=True)
                continue
            if rep >= cfg.warmup:
                if bench.target_pass is not None:
                    target_passes[key] = target_passes.get(key, 0) + int(bench.target_pass)
                times[key].append(dt)
                cpu[key].append(dc)
                if hasattr(meter, "peak"):
                    peaks[key].append(meter.peak)
    bar.close()

    breakdown: dict[str, dict] = {}
    by_kind: dict[str, dict] = {}
    for key in keys:
        if key in failed or cfg.breakdown_reps == 0:
            continue
        timer = PhaseTimer(sync=bench.device.type == "cuda")
        bench.activate(key)
        for _ in range(cfg.breakdown_reps):
            with timer.phase("other"):    # exclusive: the step's time outside every named phase
                _variant(bench, key)(timer)
        breakdown[key] = {k: v / cfg.breakdown_reps for k, v in timer.seconds.items()}
        by_kind[key] = {ph: {k: v / cfg.breakdown_reps for k, v in kinds.items()} for ph, kinds in timer.by_kind.items()}
    bench.activate("plain")
    if "plain" in breakdown and cfg.breakdown_reps:
        act = statistics.median(bench.activation_backward_only() for _ in range(cfg.breakdown_reps))
        full = breakdown["plain"].pop("backward")
        breakdown["plain"]["activation_backward"] = min(act, full)
        breakdown["plain"]["weight_grad"] = max(full - act, 0.0)
    for reg in bench.regs.values():
        reg.detach()

    base_t = statistics.median(times["plain"])
    base_m = max(peaks["plain"]) if peaks["plain"] else float("nan")
    rows = []
    for key in keys:
        if key in failed:
            rows.append({"config": key, "failed": failed[key]})
            continue
        med = statistics.median(times[key])
        used: dict[str, int] = {}
        for b in bench.backends.get(key, {}).values():
            used[b] = used.get(b, 0) + 1
        rows.append({"config": key, "median_s": med, "ratio": med / base_t,
                     "ratio_min_max": [min(times[key]) / base_t, max(times[key]) / base_t],
                     "pair_ratio": bench_stats.summary(bench_stats.pair_ratios(times[key], times["plain"])),
                     "cpu_pair_ratio": bench_stats.summary(bench_stats.pair_ratios(cpu[key], cpu["plain"])),
                     "cycle_ratio": bench_stats.cycle_ratio(
                         cfg.refresh_every if cfg.target_strategy == "separate" else 1,
                         times[key], times["plain"], cpu[key], cpu["plain"]),
                     "peak_mb": max(peaks[key]) / 2 ** 20 if peaks[key] else float("nan"),
                     "memory_ratio": max(peaks[key]) / base_m if peaks[key] else float("nan"),
                     "target_passes": target_passes.get(key),
                     "memory_note": memory_notes.get(key), "backends": used, "breakdown_s": breakdown.get(key, {}),
                     "breakdown_by_layer_type_s": by_kind.get(key, {}),
                     "backend_reasons": _reasons_by_choice(bench.backends.get(key, {}),
                                                           bench.backend_reasons.get(key, {}))})
    n_params = sum(p.numel() for p in bench.params)
    on_cpu = bench.device.type == "cpu"
    kind = "cpu_pair_ratio" if on_cpu else "pair_ratio"
    ranked, unrankable = bench_stats.rank({r["config"]: r[kind] for r in rows
                                           if "failed" not in r and r["config"] != "plain"})
    return {
        "config": asdict(cfg),
        "model_layers": bench.model.config.num_hidden_layers,
        "trainable_params": n_params,
        "memory_kind": {"allocator": "CUDA allocator peak of a step", "off": "not measured",
                        "subprocess": "peak RSS of one step after a warm-up step, each variant in a fresh process",
                        "live": "peak RSS of one step after a warm-up step, each variant in a fresh process whose "
                                "allocator returns every block >= 128 KiB when freed (RSS ~ live tensors)",
                        "inprocess": "process RSS peak sampled in the timing process (monotone on CPU: "
                                     "only the first variant's value is its own)"}.get(
                            memory),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(bench.device.type)},
        "rows": rows,
        "times": times,
        "cpu_times": cpu,
        "ranking": {"by": kind, "ranked": ranked, "unrankable": unrankable},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


if __name__ == "__main__":  # the memory subprocess of run_bench: JSON in on stdin, JSON out on stdout
    import sys

    if sys.argv[1:] != ["--memory-child"]:
        raise SystemExit("usage: python -m drpost.bench --memory-child  (internal; use `drpost bench`)")
    _req = json.loads(sys.stdin.read())
    _cfg = BenchConfig(**_req["cfg"])
    print(json.dumps(_memory_child(_cfg, _req["key"])))
