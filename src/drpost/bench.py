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
time, the ratio of medians to ``plain``, the peak memory of a step and its ratio to ``plain`` (on
CPU measured in a fresh process per variant: a warm-up step, the kernel's peak-RSS counter reset,
one measured step; on CUDA the allocator's peak), and, from
``breakdown_reps`` extra steps with a :class:`~drpost.profiling.PhaseTimer`, the time per phase:
forward, backward (activation gradients and autograd: everything in the backward pass that is not
drpost's own work), scoring, selection, chosen weight gradient, assembly (``.grad`` writing),
norm rules, optimizer. For ``plain`` the backward is split into activation backward and weight
gradient by timing a backward with every weight frozen. Nothing here asserts a time: the numbers
are for reading.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from drpost.batch import IGNORE_INDEX, causal_lm_token_losses
from drpost.profiling import PhaseTimer

__all__ = ["BenchConfig", "run_bench", "format_report", "DEFAULT_CONFIGS"]

DEFAULT_CONFIGS = ("layerwise:auto", "layerwise:sketch", "layerwise:pairwise_ghost", "layerwise:reduced_ghost",
                   "layerwise:direct", "global:auto", "rowwise:auto", "filter:auto")
MEMORY_MODES = ("auto", "subprocess", "inprocess", "off")
PHASES = ("forward", "backward", "activation_backward", "weight_grad", "scoring", "selection", "norm_rules",
          "assembly", "optimizer", "pass_1", "pass_2", "per_sample_grads")


@dataclass
class BenchConfig:
    model: str = "smollm2"  # 'smollm2' or a local HF model directory
    num_layers: int | None = None
    batch: int = 8  # B general rows
    seq: int = 128  # T tokens per row
    target: int = 1  # V target rows
    dtype: str = "fp32"  # fp32 | bf16 (bf16 autocast, fp32 weights)
    device: str = "cpu"
    reps: int = 5
    warmup: int = 1
    breakdown_reps: int = 1
    configs: list = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    naive: bool = True
    frac: float = 0.5
    sketch: str = "gaussian-64x64"
    freeze_embeddings: bool = False
    threads: int | None = None
    seed: int = 0
    target_strategy: str = "merged"  # merged | separate (target gradient captured, cached refresh_every steps)
    refresh_every: int = 1
    memory: str = "auto"  # auto (CPU: subprocess, CUDA: allocator) | subprocess | inprocess | off

    def check(self) -> None:
        from drpost import feasible as fs
        from drpost.scoring import BACKENDS

        for name, v, lo in (("batch", self.batch, 1), ("seq", self.seq, 4), ("target", self.target, 1),
                            ("reps", self.reps, 1), ("warmup", self.warmup, 0), ("breakdown_reps", self.breakdown_reps, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"bench: {name} must be an integer >= {lo}, got {v!r}")
        if self.target_strategy not in ("merged", "separate"):
            raise ValueError(f"bench: target_strategy must be merged or separate, got {self.target_strategy!r}")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"bench: refresh_every must be an integer >= 1, got {self.refresh_every!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"bench: memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"bench: dtype must be fp32 or bf16, got {self.dtype!r}")
        if not 0 < self.frac <= 1:
            raise ValueError(f"bench: frac must be in (0, 1], got {self.frac}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("bench: device cuda requested but torch.cuda.is_available() is False")
        for c in self.configs:
            parts = c.split(":")
            if len(parts) != 2 or parts[0] not in fs.FEASIBLE_SETS or parts[1] not in BACKENDS:
                raise ValueError(f"bench: config {c!r} must be FEASIBLE_SET:SCORING with a feasible set in "
                                 f"{', '.join(fs.FEASIBLE_SETS)} and scoring in {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------ memory
class _PeakRSS:
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


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    before = _proc_status_kb("VmRSS")
    reset = _reset_peak_rss()
    step()
    peak = _proc_status_kb("VmHWM")
    if peak is None:  # not Linux: the process's lifetime peak
        import resource

        peak, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    return {"peak_kb": peak, "before_kb": before, "reset": reset}


def _memory_in_subprocesses(cfg: BenchConfig, keys: list[str], progress: bool) -> dict:
    """Peak RSS of one step of every variant, each measured in its own Python process."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    out = {}
    for key in tqdm(keys, desc="memory", unit="variant", disable=not progress, dynamic_ncols=True):
        payload = json.dumps({"cfg": asdict(cfg), "key": key})
        proc = subprocess.run([sys.executable, "-m", "drpost.bench", "--memory-child"], input=payload,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            out[key] = {"error": f"memory subprocess failed (exit {proc.returncode}): {tail[:200]}"}
            continue
        out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


class _PeakCUDA:
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
        from drpost.models import load_model

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        model, _ = load_model(cfg.model, num_layers=cfg.num_layers)
        self.model = model.to(self.device)
        self.model.train()
        if cfg.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # lr tiny but non-zero: AdamW does its full work without moving the model far
        self.opt = torch.optim.AdamW(self.params, lr=1e-7)
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab = self.model.config.vocab_size
        self.general = _batch(vocab, cfg.batch, cfg.seq, gen, self.device)
        self.target = _batch(vocab, cfg.target, cfg.seq, gen, self.device)
        self.regs: dict = {}
        self.backends: dict = {}

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

        fset, scoring = key.split(":")
        if key not in self.regs:
            self.regs[key] = DataRegularizer(self.model, feasible_set=fset, frac=self.cfg.frac, scoring=scoring,
                                             sketch=self.cfg.sketch, seed=self.cfg.seed,
                                             target_strategy=self.cfg.target_strategy,
                                             refresh_every=self.cfg.refresh_every)
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
        self.backends[key] = dict(reg.layer_backends)
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
    peaks = {k: [] for k in keys}
    failed: dict[str, str] = {}
    memory_notes = {}
    if memory == "subprocess":  # first, while this process holds no model
        for key, m in _memory_in_subprocesses(cfg, keys, progress).items():
            if "error" in m:
                memory_notes[key] = m["error"]
            else:
                peaks[key] = [m["peak_kb"] * 1024]
                memory_notes[key] = {"rss_before_step_mb": m["before_kb"] / 1024, "peak_reset": m["reset"]}
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
            meter = {"allocator": lambda: _PeakCUDA(bench.device), "inprocess": _PeakRSS}.get(memory, nullcontext)()
            try:
                bench.sync()
                with meter:
                    t0 = time.perf_counter()
                    step()
                    bench.sync()
                    dt = time.perf_counter() - t0
            except (RuntimeError, NotImplementedError, torch.OutOfMemoryError) as err:
                if not key.startswith("naive:"):
                    raise
                failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                bench.opt.zero_grad(set_to_none=True)
                continue
            if rep >= cfg.warmup:
                times[key].append(dt)
                if hasattr(meter, "peak"):
                    peaks[key].append(meter.peak)
    bar.close()

    breakdown: dict[str, dict] = {}
    for key in keys:
        if key in failed or cfg.breakdown_reps == 0:
            continue
        timer = PhaseTimer(sync=bench.device.type == "cuda")
        bench.activate(key)
        for _ in range(cfg.breakdown_reps):
            _variant(bench, key)(timer)
        breakdown[key] = {k: v / cfg.breakdown_reps for k, v in timer.seconds.items()}
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
                     "peak_mb": max(peaks[key]) / 2 ** 20 if peaks[key] else float("nan"),
                     "memory_ratio": max(peaks[key]) / base_m if peaks[key] else float("nan"),
                     "memory_note": memory_notes.get(key), "backends": used, "breakdown_s": breakdown.get(key, {})})
    n_params = sum(p.numel() for p in bench.params)
    return {
        "config": asdict(cfg),
        "model_layers": bench.model.config.num_hidden_layers,
        "trainable_params": n_params,
        "memory_kind": {"allocator": "CUDA allocator peak of a step", "off": "not measured",
                        "subprocess": "peak RSS of one step after a warm-up step, each variant in a fresh process",
                        "inprocess": "process RSS peak sampled in the timing process (monotone on CPU: "
                                     "only the first variant's value is its own)"}.get(
                            memory),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"},
        "rows": rows,
        "times": times,
    }


def format_report(report: dict) -> str:
    """Markdown: the ratio table, then the breakdown table (ms per phase)."""
    c = report["config"]
    head = (f"model {c['model']} ({report['model_layers']} layers, {report['trainable_params'] / 1e6:.1f}M trainable), "
            f"B={c['batch']} T={c['seq']} V={c['target']}, {c['dtype']}, {c['device']} "
            f"({report['machine']['threads']} threads), frac {c['frac']}, target {c.get('target_strategy', 'merged')}"
            + (f" (refresh every {c['refresh_every']})" if c.get("target_strategy") == "separate" else "")
            + f", {c['reps']} timed reps after "
            f"{c['warmup']} warm-up, variants alternated; memory = {report['memory_kind']}")
    lines = [head, "", "| variant | median s | ratio to plain (min-max) | peak MB | memory ratio | back-ends (layers) |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "failed" in r:
            lines.append(f"| {r['config']} | failed: {r['failed']} | | | | |")
            continue
        lo, hi = r["ratio_min_max"]
        used = ", ".join(f"{k} {v}" for k, v in sorted(r["backends"].items()))
        lines.append(f"| {r['config']} | {r['median_s']:.3f} | {r['ratio']:.3f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['peak_mb']:.0f} | {r['memory_ratio']:.3f} | {used} |")
    phases = [p for p in PHASES if any(p in r.get("breakdown_s", {}) for r in report["rows"])]
    if phases:
        lines += ["", "Breakdown (ms per step; exclusive time per phase):", "",
                  "| variant | " + " | ".join(phases) + " | sum |", "|---|" + "---|" * (len(phases) + 1)]
        for r in report["rows"]:
            bd = r.get("breakdown_s") or {}
            if not bd:
                continue
            cells = ["" if p not in bd else f"{bd[p] * 1e3:.0f}" for p in phases]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {sum(bd.values()) * 1e3:.0f} |")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = report["config"]
    stem = f"bench-B{c['batch']}-T{c['seq']}-V{c['target']}-{c['dtype']}-{c['device'].replace(':', '')}"
    if c.get("target_strategy") == "separate":
        stem += f"-separate{c['refresh_every']}"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(format_report(report) + "\n")
    js.write_text(json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return md, js


if __name__ == "__main__":  # the memory subprocess of run_bench: JSON in on stdin, JSON out on stdout
    import sys

    if sys.argv[1:] != ["--memory-child"]:
        raise SystemExit("usage: python -m drpost.bench --memory-child  (internal; use `drpost bench`)")
    _req = json.loads(sys.stdin.read())
    _cfg = BenchConfig(**_req["cfg"])
    print(json.dumps(_memory_child(_cfg, _req["key"])))
