"""MeSO: a memory-efficient AdamW whose moments live in a per-layer sketch space.

For every compressed parameter W in R^{O x I} the optimizer keeps two sketch matrices
P1 in R^{O x k1} and P2 in R^{I x k2} (Gaussian entries N(0, 1/k), so E[P P^T] = I; a side whose
width is at most its k is left unprojected, i.e. the identity). One step on the dense gradient
G = W.grad reads

    C = P1^T G P2                                  compressed gradient, [k1, k2]
    m = b1 m + (1 - b1) C                          first moment (sketch space)
    v = b2 v + (1 - b2) C^2                        second moment (sketch space)
    u = m / (sqrt(v) / sqrt(1 - b2^t) + eps)       torch.optim.AdamW's placement of eps
    U = P1 u P2^T                                  decompressed direction, [O, I]
    W <- W (1 - lr wd) - lr / (1 - b1^t) U

so with identity sketches MeSO is torch.optim.AdamW step for step (bitwise, same operations in the
same order as its single-tensor kernel). The compressed gradient is always taken from the dense
``.grad``: gradient clipping applied to ``.grad`` before ``step()`` is honoured, the scale is that of
``.grad`` (whatever sum or mean the caller's loss used; nothing is re-divided), and a tied parameter
sees the gradient of all its uses. Parameters that are not compressed (biases, norms, 1-D tensors,
anything the selection excludes) get ordinary AdamW with the same algebra.

Moment transport (``refresh_every``): see :mod:`drpost.optim.transport`; the sketch space itself
(seeds, drawing, compress/decompress): :mod:`drpost.optim.sketches`; the state's memory:
:mod:`drpost.optim.memory`.

Precision. Moments (and the sketches they are used with) are kept in float32, or float64 for float64
parameters: never in bfloat16/float16, even for half-precision parameters.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .memory import MemoryReport
from .sketches import (CompressSpec, Sketch, SketchPair, compress, decompress, draw_sketches,
                       sketch_seed)
from .transport import transport_map, transport_moments

_STATE_VERSION = 1


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """Moments and sketches are at least float32 (float64 parameters keep float64)."""
    return torch.promote_types(p.dtype, torch.float32)


def _scalar(x: Any) -> float:
    return x.item() if isinstance(x, torch.Tensor) else x


def _width(p: Sketch, dim: int) -> int:
    return dim if p is None else p.shape[1]


@dataclass
class _LayerSketch:
    """The current sketches of one compressed parameter."""
    p1: Sketch
    p2: Sketch
    index: int           # compressed-parameter ordinal, part of the seed
    external: bool       # given from outside (stored in the state dict) rather than drawn from a seed


class MeSO(Optimizer):
    """AdamW with per-layer sketched moments (drop-in ``torch.optim.Optimizer``).

    Args:
        params: parameters or param-group dicts, as for torch.optim.AdamW (``(name, tensor)`` pairs
            are accepted and the names used in error messages).
        lr, betas, eps, weight_decay: AdamW hyperparameters (defaults of torch.optim.AdamW); they are
            param-group options, so LR schedulers work as usual.
        k1: sketch width of the output side (rows, O) of a compressed [O, I] parameter.
        k2: sketch width of the input side (columns, I); defaults to ``k1``.
        compress: which 2-D parameters get sketched moments. None: every 2-D parameter with
            ``requires_grad`` and min(O, I) > max(k1, k2) (Linear weights, and embeddings / LM
            heads unless excluded); a collection of parameters; or a predicate ``p -> bool``.
            Selecting a parameter that is not 2-D is an error. Parameters in ``sketches`` are
            always compressed.
        refresh_every: draw new sketches and transport the moments every this many steps of a
            parameter (0: never).
        seed: base seed of the sketches (see ``sketch_seed``); stored in the state dict.
        sketches: optional sketches from outside, ``{param: (P1 [O, j1] | None, P2 [I, j2] | None)}``
            (None: identity side). They are used as given (moved to the parameter's device and the
            moment dtype), replaced by seeded ones at the next refresh, and saved in the state dict.
        transport_rescale: rescale transported moments (see the module docstring).
        check_finite: raise ``FloatingPointError`` naming the parameter when a gradient holds a NaN
            or an infinity (checked before any parameter is touched; one device sync per step).
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, k1: int = 64, k2: int | None = None, compress: CompressSpec = None,
                 refresh_every: int = 0, seed: int = 0,
                 sketches: Mapping[torch.Tensor, SketchPair] | None = None,
                 transport_rescale: bool = False, check_finite: bool = True) -> None:
        k2 = k1 if k2 is None else k2
        for name, k in (("k1", k1), ("k2", k2)):
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ValueError(f"MeSO: sketch width {name} must be a positive integer, got {k!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError("MeSO: refresh_every must be a non-negative integer (0 = never), "
                             f"got {refresh_every!r}")
        self._k1, self._k2 = k1, k2
        self._refresh_every = refresh_every
        self._seed = int(seed)
        self._rescale = bool(transport_rescale)
        self._check_finite = bool(check_finite)
        self._sketch: dict[torch.Tensor, _LayerSketch] = {}
        self._num_compressed = 0
        self._compress_ids: set[int] | None = None
        self._compress_fn: Callable[[torch.Tensor], bool] | None = None
        if callable(compress):
            self._compress_fn = compress
        elif compress is not None:
            if isinstance(compress, torch.Tensor):
                compress = [compress]
            self._compress_ids = {id(p) for p in compress}
        self._external: dict[int, SketchPair] = {id(p): tuple(pair) for p, pair in (sketches or {}).items()}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for what, ids in (("compress", self._compress_ids or set()), ("sketches", set(self._external))):
            if not ids <= seen:
                raise ValueError(f"MeSO: {len(ids - seen)} parameter(s) given in `{what}` are not among "
                                 "the optimized parameters")
        self._external = {}        # now in the state of their parameters; drop the extra references

    # ----------------------------------------------------------------------------------- setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics); its compressed parameters get their sketches now."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        _check_hparams(group)
        for i, p in enumerate(group["params"]):
            label = _label(self.param_groups, gi, i)
            if not p.is_floating_point():
                raise ValueError(f"MeSO: {label} is not a real floating-point tensor")
            if self._selects(p, label):
                self._register(p, label)

    def _selects(self, p: torch.Tensor, label: str) -> bool:
        if id(p) in self._external:
            chosen, explicit = True, True
        elif self._compress_fn is not None:
            chosen, explicit = bool(self._compress_fn(p)), True
        elif self._compress_ids is not None:
            chosen, explicit = id(p) in self._compress_ids, True
        else:
            return p.dim() == 2 and p.requires_grad and min(p.shape) > max(self._k1, self._k2)
        if chosen and explicit and p.dim() != 2:
            raise ValueError(f"MeSO: {label} was chosen for compression but is not 2-D "
                             f"(shape {tuple(p.shape)})")
        return chosen

    def _register(self, p: torch.Tensor, label: str) -> None:
        index = self._num_compressed
        self._num_compressed += 1
        state = self.state[p]
        state["refresh"] = 0
        if id(p) in self._external:
            p1, p2 = self._check_sketches(p, self._external[id(p)], label)
            state["sketch_p1"], state["sketch_p2"] = p1, p2
            self._sketch[p] = _LayerSketch(p1, p2, index, external=True)
        else:
            p1, p2 = self._draw(p, index, 0)
            self._sketch[p] = _LayerSketch(p1, p2, index, external=False)

    def _draw(self, p: torch.Tensor, index: int, refresh: int) -> SketchPair:
        o, i = p.shape
        pair = draw_sketches(o, i, self._k1, self._k2, sketch_seed(self._seed, index, refresh))
        dtype = _state_dtype(p)
        return tuple(None if s is None else s.to(device=p.device, dtype=dtype) for s in pair)

    @staticmethod
    def _check_sketches(p: torch.Tensor, pair: SketchPair, label: str) -> SketchPair:
        if p.dim() != 2:
            raise ValueError(f"MeSO: sketches given for {label}, which is not 2-D (shape {tuple(p.shape)})")
        if len(pair) != 2:
            raise ValueError(f"MeSO: sketches for {label} must be a pair (P1, P2)")
        out = []
        for side, (s, dim) in enumerate(zip(pair, p.shape), start=1):
            if s is None:
                out.append(None)
                continue
            if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != dim or s.shape[1] < 1:
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"MeSO: sketch P{side} for {label} must be [{dim}, k], got {shape}")
            if not torch.isfinite(s).all():
                raise ValueError(f"MeSO: sketch P{side} for {label} has non-finite entries")
            out.append(s.detach().to(device=p.device, dtype=_state_dtype(p)))
        return tuple(out)

    # ------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step in sketch space for compressed parameters, plain AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []   # (group index, index in group, param, gradient in its moment space)
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("MeSO does not support sparse gradients "
                                       f"({_label(self.param_groups, gi, i)})")
                dtype = _state_dtype(p)
                g = g if g.dtype == dtype else g.to(dtype)
                sk = self._sketch.get(p)
                work.append((gi, i, p, g if sk is None else compress(g, sk.p1, sk.p2)))
        if self._check_finite and work:
            flags = [torch.isfinite(c).all() for *_, c in work]
            if not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
                gi, i, _, _ = next(w for w, f in zip(work, flags) if not bool(f))
                raise FloatingPointError(f"MeSO: non-finite gradient in {_label(self.param_groups, gi, i)}")
        for gi, _, p, c in work:
            self._update(p, c, self.param_groups[gi])
        return loss

    def _update(self, p: torch.Tensor, c: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update, run on the compressed gradient ``c``."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(c, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(c, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"]
        lr, weight_decay, eps = _scalar(group["lr"]), group["weight_decay"], group["eps"]
        beta1, beta2 = (_scalar(b) for b in group["betas"])

        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(c, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(c, c, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)

        sk = self._sketch.get(p)
        if sk is None or (sk.p1 is None and sk.p2 is None):
            if p.dtype == exp_avg.dtype:
                p.addcdiv_(exp_avg, denom, value=-step_size)
            else:
                p.add_(exp_avg / denom, alpha=-step_size)
        else:
            p.add_(decompress(exp_avg / denom, sk.p1, sk.p2), alpha=-step_size)

        if sk is not None and self._refresh_every and step % self._refresh_every == 0:
            self._refresh(p, None)

    # ------------------------------------------------------------------------- sketch refresh

    def refresh_sketches(self, new: Mapping[torch.Tensor, SketchPair] | None = None) -> None:
        """Re-sketch now and transport the moments: every compressed parameter draws its next seeded
        sketches, or, with ``new``, only the parameters in it take the given (external) sketches."""
        if new is None:
            for p in list(self._sketch):
                self._refresh(p, None)
            return
        for p, pair in new.items():
            if p not in self._sketch:
                raise ValueError("MeSO: refresh_sketches got a parameter that is not compressed by this optimizer")
            self._refresh(p, pair)

    @torch.no_grad()
    def _refresh(self, p: torch.Tensor, pair: SketchPair | None) -> None:
        sk = self._sketch[p]
        state = self.state[p]
        refresh = int(state.get("refresh", 0)) + 1
        if pair is None:
            p1, p2 = self._draw(p, sk.index, refresh)
        else:
            p1, p2 = self._check_sketches(p, pair, self._describe(p))
        if "exp_avg" in state:
            a, b = transport_map(sk.p1, p1), transport_map(sk.p2, p2)
            state["exp_avg"], state["exp_avg_sq"] = transport_moments(
                state["exp_avg"], state["exp_avg_sq"], a, b, self._rescale)
        state["refresh"] = refresh
        if pair is None:
            state.pop("sketch_p1", None)
            state.pop("sketch_p2", None)
        else:
            state["sketch_p1"], state["sketch_p2"] = p1, p2
        self._sketch[p] = _LayerSketch(p1, p2, sk.index, external=pair is not None)

    def sketches(self) -> dict[torch.Tensor, SketchPair]:
        """The current sketches {param: (P1 [O, k1] | None, P2 [I, k2] | None)} of the compressed
        parameters (None: identity side). They change at every refresh (and are copied by
        ``load_state_dict``), so a consumer that shares them should ask again afterwards."""
        return {p: (sk.p1, sk.p2) for p, sk in self._sketch.items()}

    def is_compressed(self, p: torch.Tensor) -> bool:
        return p in self._sketch

    # ------------------------------------------------------------------------------ reporting

    def memory_report(self) -> MemoryReport:
        """Optimizer-state bytes (from shapes; valid before the first step) against AdamW."""
        comp = dense = adamw = adamw_comp = 0
        sketch_ptrs: dict[tuple[int, int], int] = {}
        n_comp = n_dense = 0
        for group in self.param_groups:
            for p in group["params"]:
                item = torch.empty((), dtype=_state_dtype(p)).element_size()
                adamw += 2 * p.numel() * 4
                sk = self._sketch.get(p)
                if sk is None:
                    dense += 2 * p.numel() * item
                    n_dense += 1
                    continue
                n_comp += 1
                adamw_comp += 2 * p.numel() * 4
                comp += 2 * _width(sk.p1, p.shape[0]) * _width(sk.p2, p.shape[1]) * item
                for s in (sk.p1, sk.p2):
                    if s is not None:
                        sketch_ptrs[(s.data_ptr(), s.numel())] = s.numel() * s.element_size()
        return MemoryReport(comp, dense, sum(sketch_ptrs.values()), adamw, adamw_comp, n_comp, n_dense)

    # ------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``meso`` entry (base seed and sketch settings). Per
        parameter the state holds the refresh count, so seeded sketches are regenerated on load;
        external sketches are stored as tensors."""
        sd = super().state_dict()
        sd["meso"] = {"version": _STATE_VERSION, "seed": self._seed, "k1": self._k1, "k2": self._k2,
                      "refresh_every": self._refresh_every, "transport_rescale": self._rescale}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict``; the run continues bit-identically. Unlike torch's loader, saved
        tensors keep their dtype (float32 moments of a bfloat16 parameter stay float32), and the
        base seed is taken from the checkpoint."""
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key == "step":
                    self.state[p][key] = int(_scalar(value))
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        meso = state_dict.get("meso") or {}
        if "seed" in meso:
            self._seed = int(meso["seed"])
        for key, mine in (("refresh_every", self._refresh_every), ("transport_rescale", self._rescale)):
            if key in meso and meso[key] != mine:
                warnings.warn(f"MeSO: checkpoint has {key}={meso[key]!r}, this optimizer {mine!r}; "
                              "keeping this optimizer's value", stacklevel=2)
        self._rebuild_sketches()

    def _rebuild_sketches(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                state = self.state[p]
                sk = self._sketch.get(p)
                label = _label(self.param_groups, gi, i)
                if sk is None:
                    if "refresh" in state:
                        raise ValueError(f"MeSO: checkpoint holds sketched moments for {label}, which this "
                                         "optimizer keeps dense")
                    if "exp_avg" in state and state["exp_avg"].shape != p.shape:
                        raise ValueError(f"MeSO: checkpoint moments of {label} have shape "
                                         f"{tuple(state['exp_avg'].shape)}, expected {tuple(p.shape)}")
                    continue
                if "refresh" not in state:
                    if "exp_avg" in state:
                        raise ValueError(f"MeSO: checkpoint holds dense moments for {label}, which this "
                                         "optimizer compresses")
                    state["refresh"] = 0          # never seen by the saved optimizer: keep its sketch
                    if sk.external:
                        state["sketch_p1"], state["sketch_p2"] = sk.p1, sk.p2
                    continue
                state["refresh"] = int(state["refresh"])
                if "sketch_p1" in state or "sketch_p2" in state:
                    p1, p2 = self._check_sketches(p, (state.get("sketch_p1"), state.get("sketch_p2")), label)
                    state["sketch_p1"], state["sketch_p2"] = p1, p2
                    external = True
                else:
                    p1, p2 = self._draw(p, sk.index, state["refresh"])
                    external = False
                expected = (_width(p1, p.shape[0]), _width(p2, p.shape[1]))
                if "exp_avg" in state and tuple(state["exp_avg"].shape) != expected:
                    raise ValueError(f"MeSO: checkpoint moments of {label} have shape "
                                     f"{tuple(state['exp_avg'].shape)}, expected {expected} "
                                     "(different sketch widths k1, k2?)")
                self._sketch[p] = _LayerSketch(p1, p2, sk.index, external)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items()
                      if k in ("_k1", "_k2", "_refresh_every", "_seed", "_rescale", "_check_finite",
                               "_sketch", "_num_compressed", "_compress_ids", "_compress_fn", "_external")})
        return state

    def _describe(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return _label(self.param_groups, gi, i)
        return f"parameter of shape {tuple(p.shape)}"


def _label(groups: list[dict], gi: int, i: int) -> str:
    """How error messages name parameter ``i`` of param group ``gi``."""
    group = groups[gi]
    p = group["params"][i]
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r} (shape {tuple(p.shape)})"
    return f"parameter #{i} of param group {gi} (shape {tuple(p.shape)})"


def _check_hparams(group: dict) -> None:
    lr = _scalar(group["lr"])
    if not lr >= 0:
        raise ValueError(f"MeSO: invalid learning rate {lr!r} (must be >= 0)")
    if not group["eps"] >= 0:
        raise ValueError(f"MeSO: invalid eps {group['eps']!r} (must be >= 0)")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"MeSO: invalid weight_decay {group['weight_decay']!r} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= _scalar(b) < 1.0 for b in betas):
        raise ValueError(f"MeSO: invalid betas {tuple(betas)!r} (each must be in [0, 1))")
