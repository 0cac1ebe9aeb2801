"""A scored "layer": the parameters of one module, or one parameter shared by several modules
(tied weights form one group and every use is counted, METHOD §9.4).

A group collects the factors of its modules' backward calls for one pass, turns the target rows
into the representation its scoring back-end needs, scores the general samples, and accumulates
the gradient of the samples the feasible set chose. Which samples are chosen is decided by the
engine (drpost.feasible); how a parameter is laid out is answered by its rule (drpost.layers);
how a back-end scores is answered by the back-end (drpost.scoring, looked up by name).
"""
from __future__ import annotations

import dataclasses

import torch

from .feasible import normalise_scores
from .scoring import BACKEND_TABLE, ScoringConfig, add_into, cache_reader, choose_for_group

__all__ = ["LayerGroup", "ScoringConfig", "add_into"]


class LayerGroup:
    def __init__(self, index: int):
        self.index = index
        self.names: list[str] = []
        self.rules: list = []
        self.params: list[torch.nn.Parameter] = []
        self.calls = 0                  # forward calls in the current pass (recomputations not counted)
        self.received = 0               # backward calls whose factors reached the pipeline in this pass
        self.pending: list = []         # (rule, general factors, target factors) per finished backward call
        self.cache: dict | None = None  # separate strategy: {"kind", "repr"} of the target
        self.sketches: dict = {}        # id(rule) -> LayerSketch (scoring/sketch.py)
        self.acc: dict = {}             # raw sums of chosen per-sample gradients
        self.count = None               # chosen supervised tokens (scalar, or per row)
        self.bad = None                 # device flag: non-finite score/target seen
        self.input_sharers: set = set()  # groups fed the same input tensor in this forward (StepState.note_input)

    @property
    def name(self) -> str:
        return "+".join(self.names)

    def signature(self) -> tuple:
        """What a cached target representation depends on: the modules (names, rule types) and the
        parameter objects with their shapes, dtypes and devices."""
        return (self.name, tuple(type(r).__name__ for r in self.rules),
                tuple((id(p), tuple(p.shape), p.dtype, p.device) for p in self.params))

    @property
    def multi_use(self) -> bool:
        return len(self.rules) > 1 or self.calls > 1

    def take_pending(self) -> list:
        parts, self.pending = self.pending, []
        return parts

    # ------------------------------------------------------------------ layout (asked of the rules)
    def _rule_of(self, p: torch.nn.Parameter):
        for rule in self.rules:
            if any(q is p for q in rule.params):
                return rule
        raise AssertionError("parameter not in group")

    def rows_broadcast(self, p: torch.nn.Parameter, count: torch.Tensor) -> torch.Tensor:
        """Reshape a per-row count so that it broadcasts against parameter p."""
        return count if count.dim() == 0 else self._rule_of(p).rows_broadcast(p, count)

    def row_sum(self, p, g: torch.Tensor, rows: bool) -> torch.Tensor:
        """Sum a per-sample quantity [B, *p.shape] to [B], or per output row to [B, R]."""
        return g.flatten(1).sum(1) if not rows else self._rule_of(p).row_sum(p, g, rows)

    # ------------------------------------------------------------------ back-end and target side
    def backend(self, cfg: ScoringConfig, rule, b: int, v: int, s: int, k: int, measure=None) -> str:
        """The back-end for this step's shape; why it was chosen is kept in ``backend_reason``."""
        name, self.backend_reason = choose_for_group(cfg, self.rules, self.calls, rule, b, v, s, k, measure)
        return name

    def target_repr(self, cfg: ScoringConfig, parts, backend: str, rows: bool):
        """The target rows in the form the back-end needs (raw sums over target rows)."""
        return BACKEND_TABLE[backend].target(self, cfg, parts, rows)

    def capture(self, cfg: ScoringConfig, parts, backend: str, rows: bool) -> None:
        """Separate strategy: add a target pass (or chunk) to the cached target representation."""
        be = BACKEND_TABLE[backend]
        new = be.target(self, cfg, parts, rows)
        old = self.cache
        if old is None or old["kind"] != be.cache_kind:
            self.cache = {"kind": be.cache_kind, "repr": new}
        else:
            old["repr"] = be.extend(old["repr"], new)

    def cached_target(self, cfg: ScoringConfig, rule, b, v, s, k, measure=None):
        """(backend, target representation) from the separate strategy's cache."""
        if self.cache is None:
            raise RuntimeError(f"no target gradient cached for layer {self.name}: the target pass did not "
                               "reach it (is the layer used by the target batch?)")
        kind = self.cache["kind"]
        if measure is not None:
            measure = dataclasses.replace(measure, cache_kind=kind)
        backend = self.backend(cfg, rule, b, v, s, k, measure)
        if BACKEND_TABLE[backend].cache_kind != kind:   # score with what the cache holds
            backend = cache_reader(kind).name
            self.backend_reason = f"the cached target is {kind}"
        return backend, self.cache["repr"]

    def cache_state(self) -> dict | None:
        """The cached target in checkpoint form ({"kind", "repr"} with rule/parameter indices), or None."""
        if self.cache is None:
            return None
        kind = self.cache["kind"]
        return {"kind": kind, "repr": cache_reader(kind).save(self, self.cache["repr"])}

    def load_cache_state(self, state: dict | None) -> None:
        """Inverse of :meth:`cache_state` (None clears the cache)."""
        if state is None:
            self.cache = None
            return
        kind = state["kind"]
        self.cache = {"kind": kind, "repr": cache_reader(kind).load(self, state["repr"])}

    # ------------------------------------------------------------------ scores
    def scores(self, cfg: ScoringConfig, parts, target, backend: str, rows: bool):
        """Raw scores <G_i, sum of target rows' gradients> [B] (or [B, R]) and, for ``direct``, the
        materialised per-sample gradients (reused for the update) or None."""
        return BACKEND_TABLE[backend].scores(self, cfg, parts, target, rows)

    def normalise(self, cfg: ScoringConfig, parts, scores, target, backend, rows, tokens, target_tokens):
        """Scores as the feasible set should see them (``score_norm``)."""
        if cfg.score_norm == "none":
            return scores
        if cfg.score_norm == "per_token":
            return normalise_scores(scores, "per_token", tokens=tokens)
        # cosine: |G_i| from the same factors, |g_T| from the target representation
        be = BACKEND_TABLE[backend]
        sq = be.sample_sq_norms(self, cfg, parts, rows)
        tsq = be.target_sq_norm(self, cfg, target, rows)
        tnorm = tsq.clamp_min(0).sqrt() / target_tokens
        return normalise_scores(scores, "cosine", sample_norms=sq.clamp_min(0).sqrt(), target_norm=tnorm)

    def gram(self, cfg: ScoringConfig, parts, backend) -> torch.Tensor:
        """Train-train Gram matrix <G_i, G_j> [B, B] (for ``greedy``)."""
        return BACKEND_TABLE[backend].gram(self, cfg, parts)

    # ------------------------------------------------------------------ update
    def accumulate(self, parts, weights, idx, per_sample, tokens) -> torch.Tensor:
        """Add sum_i w_i G_i of this pass to the accumulator; return the chosen-token count.
        ``idx`` (a fixed-size top-k set) is read by the rules as the chosen rows only (gathered, or on
        CPU as views of its runs of consecutive rows), so that the GEMM costs k/B of a plain weight
        gradient; ``weights=None`` means every sample."""
        if per_sample is not None and weights is not None and weights.dim() == 1:
            for p, g in per_sample.items():
                add_into(self.acc, p, torch.einsum("b,b...->...", weights.to(g.dtype), g))
        else:
            for rule, gen, _ in parts:
                rule.chosen_into(self.acc, gen, weights, idx)
        w = weights if weights is not None else torch.ones_like(tokens)
        count = (w * (tokens if w.dim() == 1 else tokens[:, None])).sum(0)
        self.count = count if self.count is None else self.count + count
        return count

    def reset(self) -> None:
        self.acc, self.count, self.bad, self.pending, self.calls, self.received = {}, None, None, [], 0, 0
