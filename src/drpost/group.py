"""A scored "layer": the parameters of one module, or one parameter shared by several modules
(tied weights form one group and every use is counted, METHOD §9.4).

A group collects the factors of its modules' backward calls for one pass, turns the target rows
into the representation its scoring back-end needs, scores the general samples, and accumulates
the gradient of the samples the feasible set chose. Which samples are chosen is decided by the
engine (drpost.feasible); the group only knows how to score and how to sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .feasible import normalise_scores
from .layers import Factors, tied
from .scoring import LayerSketch, choose_backend


@dataclass
class ScoringConfig:
    scoring: str
    sketch_kind: str
    sketch_k1: int
    sketch_k2: int
    seed: int
    direct_max_bytes: float
    score_norm: str
    target_factors: bool    # may the target side be kept as factors (pairwise ghost)?


def add_into(acc: dict, key, g: torch.Tensor, dtype=None) -> None:
    """acc[key] += g (in ``dtype``, default the key's dtype when it is a parameter)."""
    g = g.to(dtype if dtype is not None else key.dtype)
    if key in acc:
        acc[key].add_(g)
    else:
        acc[key] = g.clone() if isinstance(key, torch.Tensor) and g.data_ptr() == key.data_ptr() else g


class LayerGroup:
    def __init__(self, index: int):
        self.index = index
        self.names: list[str] = []
        self.rules: list = []
        self.params: list[torch.nn.Parameter] = []
        self.calls = 0                  # forward calls in the current pass
        self.pending: list = []         # (rule, general factors, target factors) per finished backward call
        self.cache: dict | None = None  # separate strategy: {"kind", "repr"} of the target
        self.sketches: dict = {}
        self.acc: dict = {}             # raw sums of chosen per-sample gradients
        self.count = None               # chosen supervised tokens (scalar, or per row)
        self.bad = None                 # device flag: non-finite score/target seen

    @property
    def name(self) -> str:
        return "+".join(self.names)

    @property
    def multi_use(self) -> bool:
        return len(self.rules) > 1 or self.calls > 1

    def take_pending(self) -> list:
        parts, self.pending = self.pending, []
        return parts

    # ------------------------------------------------------------------ geometry
    def rows_broadcast(self, p: torch.nn.Parameter, count: torch.Tensor) -> torch.Tensor:
        """Reshape a per-row count so that it broadcasts against parameter p."""
        if count.dim() == 0:
            return count
        kind = self._role(p)
        return count if kind == "bias" else (count[None, :] if kind == "weight_t" else count[:, None])

    def row_sum(self, p, g: torch.Tensor, rows: bool) -> torch.Tensor:
        """Sum a per-sample quantity [B, *p.shape] to [B], or per output row to [B, R]."""
        if not rows:
            return g.flatten(1).sum(1)
        kind = self._role(p)
        return g if kind == "bias" else (g.sum(1) if kind == "weight_t" else g.sum(2))

    def _role(self, p) -> str:
        for rule in self.rules:
            if p is getattr(rule, "bias", None):
                return "bias"
            if p is getattr(rule, "weight", None):
                return "weight_t" if getattr(rule, "transposed", False) else "weight"
        raise AssertionError("parameter not in group")

    # ------------------------------------------------------------------ back-end and target side
    def backend(self, cfg: ScoringConfig, rule, b: int, v: int, s: int, k: int) -> str:
        if self.multi_use and self._tied_ghost(cfg):
            if cfg.scoring == "pairwise_ghost":
                return "pairwise_ghost"
            ghost, dense = tied.cost(self.rules, b, v, s)
            return "pairwise_ghost" if ghost < dense else "reduced_ghost"
        if cfg.scoring == "sketch":
            return "reduced_ghost" if (self.multi_use or rule.supports == ("reduced_ghost",)) else "sketch"
        return choose_backend(cfg.scoring, rule, b, v, s, k, multi_use=self.multi_use,
                              target_factors_available=cfg.target_factors, max_bytes=cfg.direct_max_bytes)

    def _tied_ghost(self, cfg: ScoringConfig) -> bool:
        """Tied Linear/Embedding uses, each called once, scored from factors (layers/tied.py)."""
        return (cfg.scoring != "reduced_ghost" and cfg.target_factors
                and self.calls == len(self.rules) and tied.ghostable(self.rules))

    def sketch_of(self, cfg: ScoringConfig, rule) -> LayerSketch:
        sk = self.sketches.get(id(rule))
        if sk is None:
            sk = LayerSketch(cfg.sketch_kind, cfg.sketch_k1, cfg.sketch_k2, rule.out_features, rule.in_features,
                             rule.weight is not None, rule.has_bias,
                             seed=cfg.seed * 1_000_003 + self.index * 7919 + len(self.sketches),
                             device=rule.module.weight.device)
            self.sketches[id(rule)] = sk
        return sk

    def target_repr(self, cfg: ScoringConfig, parts, backend: str, rows: bool):
        """The target rows in the form the back-end needs (raw sums over target rows)."""
        if backend == "pairwise_ghost":
            rules = list({id(r): r for r, _, _ in parts}.values())
            return [(rule, Factors.cat([t for r, _, t in parts if r is rule])) for rule in rules]
        if backend == "sketch":
            return {id(rule): rule.sketch(t, self.sketch_of(cfg, rule), rows).sum(0) for rule, _, t in parts}
        dense: dict = {}
        for rule, _, t in parts:
            for p, g in rule.target_dense(t).items():
                add_into(dense, p, g, torch.promote_types(g.dtype, torch.float32))
        return dense

    def capture(self, cfg: ScoringConfig, parts, backend: str, rows: bool) -> None:
        """Separate strategy: add a target pass (or chunk) to the cached target representation."""
        kind = backend if backend in ("pairwise_ghost", "sketch") else "dense"
        new = self.target_repr(cfg, parts, backend, rows)
        old = self.cache
        if old is None or old["kind"] != kind:
            self.cache = {"kind": kind, "repr": new}
        elif kind == "pairwise_ghost":      # chunks are concatenated, never overwritten (METHOD §9.11)
            have = {id(r): f for r, f in old["repr"]}
            old["repr"] = [(r, Factors.cat([have[id(r)], f]) if id(r) in have else f) for r, f in new]
        else:
            for key, val in new.items():
                old["repr"][key] = old["repr"][key] + val if key in old["repr"] else val

    def cached_target(self, cfg: ScoringConfig, rule, b, v, s, k):
        """(backend, target representation) from the separate strategy's cache."""
        if self.cache is None:
            raise RuntimeError(f"no target gradient cached for layer {self.name}: the target pass did not "
                               "reach it (is the layer used by the target batch?)")
        kind = self.cache["kind"]
        backend = kind if kind != "dense" else self.backend(cfg, rule, b, v, s, k)
        if kind == "dense" and backend in ("pairwise_ghost", "sketch"):
            backend = "reduced_ghost"
        return backend, self.cache["repr"]

    # ------------------------------------------------------------------ scores
    def scores(self, cfg: ScoringConfig, parts, target, backend: str, rows: bool):
        """Raw scores <G_i, sum of target rows' gradients> [B] (or [B, R]) and, for ``direct``, the
        materialised per-sample gradients (reused for the update) or None."""
        if backend == "direct" and len(parts) == 1:
            rule, gen, _ = parts[0]
            nbytes = 4.0 * gen.n * sum(p.numel() for p in rule.params)
            if rows:
                return rule.dense_scores(gen, target, rows), None
            if nbytes <= cfg.direct_max_bytes:
                per_sample = rule.per_sample(gen)
                return _dot(per_sample, target), per_sample
            chunk = max(1, int(cfg.direct_max_bytes // max(nbytes / gen.n, 1)))
            return torch.cat([_dot(rule.per_sample(gen.rows(slice(i, i + chunk))), target)
                              for i in range(0, gen.n, chunk)]), None
        raw = None
        if backend == "pairwise_ghost" and self.multi_use:
            for rule, gen, _ in parts:
                for rule_t, tgt in target:
                    sc = tied.cross_scores(rule, gen, rule_t, tgt, rows)
                    raw = sc if raw is None else raw + sc
            return raw, None
        for rule, gen, _ in parts:
            if backend == "pairwise_ghost":
                sc = rule.pairwise_scores(gen, {id(r): f for r, f in target}[id(rule)], rows)
            elif backend == "sketch":
                c = rule.sketch(gen, self.sketch_of(cfg, rule), rows)
                sc = (c * target[id(rule)].to(c.dtype)).sum(-1)
            else:
                sc = rule.dense_scores(gen, target, rows)
            raw = sc if raw is None else raw + sc
        return raw, None

    def _per_sample_sum(self, parts) -> dict:
        ps: dict = {}
        for rule, gen, _ in parts:
            for p, g in rule.per_sample(gen).items():
                add_into(ps, p, g)
        return ps

    def normalise(self, cfg: ScoringConfig, parts, scores, target, backend, rows, tokens, target_tokens):
        """Scores as the feasible set should see them (``score_norm``)."""
        if cfg.score_norm == "none":
            return scores
        if cfg.score_norm == "per_token":
            return normalise_scores(scores, "per_token", tokens=tokens)
        # cosine: |G_i| from the same factors, |g_T| from the target representation
        if self.multi_use:
            sq = sum(self.row_sum(p, g.pow(2), rows) for p, g in self._per_sample_sum(parts).items())
        elif backend == "sketch":
            rule, gen, _ = parts[0]
            sq = rule.sketch(gen, self.sketch_of(cfg, rule), rows).pow(2).sum(-1)
        else:
            rule, gen, _ = parts[0]
            sq = rule.sq_norms(gen, rows)
        if backend == "pairwise_ghost" and (rows or self.multi_use):
            dense: dict = {}
            for rule, tf in target:
                for p, g in rule.target_dense(tf).items():
                    add_into(dense, p, g, torch.promote_types(g.dtype, torch.float32))
            target, backend = dense, "reduced_ghost"
        elif backend == "pairwise_ghost":
            rule, tf = target[0]
            tsq = rule.gram(tf).sum()
        if backend == "sketch":
            tsq = sum(t.pow(2).sum(-1) for t in target.values())
        elif backend != "pairwise_ghost":
            tsq = sum(self.row_sum(p, g.pow(2)[None], rows)[0] for p, g in target.items())
        tnorm = tsq.clamp_min(0).sqrt() / target_tokens
        return normalise_scores(scores, "cosine", sample_norms=sq.clamp_min(0).sqrt(), target_norm=tnorm)

    def gram(self, cfg: ScoringConfig, parts, backend) -> torch.Tensor:
        """Train-train Gram matrix <G_i, G_j> [B, B] (for ``greedy``)."""
        if self.multi_use:
            flat = torch.cat([g.flatten(1) for g in self._per_sample_sum(parts).values()], 1)
            return flat @ flat.t()
        rule, gen, _ = parts[0]
        if backend == "sketch":
            c = rule.sketch(gen, self.sketch_of(cfg, rule), False)
            return c @ c.t()
        return rule.gram(gen)

    # ------------------------------------------------------------------ update
    def accumulate(self, parts, weights, idx, per_sample, tokens) -> torch.Tensor:
        """Add sum_i w_i G_i of this pass to the accumulator; return the chosen-token count.
        ``idx`` (a fixed-size top-k set) gathers the chosen rows so that the GEMM costs k/B of a
        plain weight gradient; ``weights=None`` means every sample."""
        if per_sample is not None and weights is not None and weights.dim() == 1:
            for p, g in per_sample.items():
                add_into(self.acc, p, torch.einsum("b,b...->...", weights.to(g.dtype), g))
        else:
            for rule, gen, _ in parts:
                if idx is not None:
                    gen = Factors(gen.a.index_select(0, idx), gen.d.index_select(0, idx))
                for p, g in rule.chosen(gen, None if idx is not None else weights).items():
                    add_into(self.acc, p, g)
        w = weights if weights is not None else torch.ones_like(tokens)
        count = (w * (tokens if w.dim() == 1 else tokens[:, None])).sum(0)
        self.count = count if self.count is None else self.count + count
        return count

    def reset(self) -> None:
        self.acc, self.count, self.bad, self.pending, self.calls = {}, None, None, [], 0


def _dot(per_sample: dict, dense: dict) -> torch.Tensor:
    return sum((g.flatten(1) * dense[p].flatten().to(g.dtype)).sum(1) for p, g in per_sample.items() if p in dense)
