"""Factorised random projections of per-sample gradients (LoGra-style Kronecker sketches).

For a linear layer the per-sample gradient is G_i = sum_s delta_s x_s^T, so its two-sided sketch
P1^T G_i P2 = sum_s (P1^T delta_s)(P2^T x_s)^T needs only the projected factors. With E[P P^T] = I
(Gaussian N(0, 1/k) entries, or a CountSketch with random signs) the sketched inner product is an
unbiased estimate of <G_i, G_T>. A side whose width is at most k is left unprojected (identity).
The bias is handled as an implicit constant-1 input column.

Layers fed one input tensor (q/k/v, gate/up, found by the forward: ``group.input_sharers``) draw
the same input-side projection P2, seeded by the set's first name, so that x P2 is computed once
between them (:class:`drpost.layers.input_products.InputProducts`). Each layer's sketched score stays
unbiased (its layerwise choice has the same distribution as with a P2 of its own); the sharers'
estimation errors are correlated, which only a sum of their scores (the ``global`` feasible set) sees.

The ``sketch`` back-end scores, normalises and builds Gram matrices from these sketches; a rule
takes part by listing "sketch" in ``supports`` and giving ``sketch`` and ``sketch_dims``.
"""
from __future__ import annotations

import re
import zlib

import torch

from ..layers.input_products import INPUT_PRODUCTS
from .base import ScoringBackend

_SPEC = re.compile(r"^(gaussian|normal|countsketch|sjlt)-(\d+)(?:x(\d+))?$")


def parse_sketch(spec: str) -> tuple[str, int, int]:
    m = _SPEC.match(str(spec).strip().lower().replace("*", "x"))
    if not m:
        raise ValueError(f"bad sketch spec {spec!r}: use 'gaussian-64x64' or 'countsketch-64x64' "
                         "(kind-k1xk2; k1 projects the output-gradient side, k2 the input side)")
    kind = {"normal": "gaussian", "sjlt": "countsketch"}.get(m.group(1), m.group(1))
    k1 = int(m.group(2))
    k2 = int(m.group(3) or k1)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"sketch sizes must be positive, got {spec!r}")
    return kind, k1, k2


class _Side:
    """One side's projection R^d -> R^k (or the identity when k >= d)."""

    def __init__(self, kind: str, d: int, k: int, gen: torch.Generator, device, dtype):
        self.identity = k >= d
        self.kind, self.d, self.k = kind, d, (d if k >= d else k)
        if self.identity:
            return
        if kind == "gaussian":
            self.matrix = (torch.randn(d, k, generator=gen) / k ** 0.5).to(device=device, dtype=dtype)
        else:
            self.bucket = torch.randint(0, k, (d,), generator=gen).to(device)
            self.sign = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return t
        if self.kind == "gaussian":
            return t @ self.matrix.to(t.dtype)
        out = t.new_zeros(*t.shape[:-1], self.k)
        return out.index_add_(-1, self.bucket, t * self.sign.to(t.dtype))


class LayerSketch:
    """Projections for one layer: ``left`` acts on the output gradient [.., O], ``right`` on the
    input [.., I] followed by an implicit column of ones when the layer has a trainable bias
    (and without the input columns when the weight is frozen). With ``right_seed`` the input side
    is drawn from its own generator, so that layers given the same seed and widths draw the same
    P2, and ``right`` is computed once per input tensor among them."""

    def __init__(self, kind: str, k1: int, k2: int, out_dim: int, in_dim: int, weight: bool, bias: bool,
                 seed: int, device, dtype=torch.float32, right_seed: int | None = None):
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        self.weight, self.bias = weight, bias
        self.left_side = _Side(kind, out_dim, k1, gen, device, dtype)
        right_dim = in_dim * int(weight) + int(bias)
        if right_seed is not None:
            gen = torch.Generator().manual_seed(int(right_seed) & 0x7FFFFFFFFFFFFFFF)
        self.right_side = _Side(kind, right_dim, k2, gen, device, dtype)
        plain = self.right_side.identity and not bias      # x itself: nothing to share
        self.shared = None if right_seed is None or plain else ("sketch", right_seed, kind, right_dim, k2, weight, bias)

    def left(self, d: torch.Tensor) -> torch.Tensor:
        return self.left_side.apply(d)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return self._right(x)
        return INPUT_PRODUCTS.get(self.shared, (x,), lambda: self._right(x))

    def _right(self, x: torch.Tensor) -> torch.Tensor:
        side = self.right_side
        if not self.weight:
            x = x[..., :0]
        if not self.bias:
            return side.apply(x)
        if not side.identity and side.kind == "gaussian":   # x @ M[:I] + M[I] without concatenating
            m = side.matrix.to(x.dtype)
            return x @ m[:-1] + m[-1] if x.shape[-1] else m[-1].expand(*x.shape[:-1], -1).clone()
        return side.apply(torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1))


def _shared_right_seed(group, cfg, rule) -> int | None:
    """The input-side seed a one-rule, one-call Linear group shares with the other groups its input
    fed in the forward (seeded by the first of their names: the same on every rank and run)."""
    sharers = group.input_sharers
    if not rule.shares_input or len(sharers) < 2 or group.multi_use:     # multi_use: several rules or calls
        return None
    return cfg.seed * 1_000_003 + 15_485_863 * (zlib.crc32(min(sharers).encode()) + 1)


def projection(group, cfg, rule) -> LayerSketch:
    """The group's fixed random projection for one rule (drawn once, seeded by layer and rule; the
    input side by its sharers)."""
    sk = group.sketches.get(id(rule))
    if sk is None:
        sk = LayerSketch(cfg.sketch_kind, cfg.sketch_k1, cfg.sketch_k2, *rule.sketch_dims(),
                         seed=cfg.seed * 1_000_003 + group.index * 7919 + len(group.sketches),
                         device=rule.params[0].device, right_seed=_shared_right_seed(group, cfg, rule))
        group.sketches[id(rule)] = sk
    return sk


class Sketch(ScoringBackend):
    name = "sketch"
    cache_kind = "sketch"

    def target(self, group, cfg, parts, rows):
        return {id(rule): rule.sketch(t, projection(group, cfg, rule), rows).sum(0) for rule, _, t in parts}

    def save(self, group, rep):
        ids = [id(r) for r in group.rules]
        return {ids.index(k): v for k, v in rep.items()}

    def load(self, group, rep):
        return {id(group.rules[i]): v for i, v in rep.items()}

    def part_scores(self, group, cfg, rule, gen, target, rows):
        c = rule.sketch(gen, projection(group, cfg, rule), rows)
        return (c * target[id(rule)].to(c.dtype)).sum(-1)

    def one_sq_norms(self, group, cfg, rule, gen, rows):
        return rule.sketch(gen, projection(group, cfg, rule), rows).pow(2).sum(-1)

    def target_sq_norm(self, group, cfg, target, rows):
        return sum(t.pow(2).sum(-1) for t in target.values())

    def one_gram(self, group, cfg, rule, gen):
        c = rule.sketch(gen, projection(group, cfg, rule), False)
        return c @ c.t()
