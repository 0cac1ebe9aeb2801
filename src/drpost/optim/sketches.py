"""The sketch space of MeSO: per-layer Gaussian sketches, their seeds, and the maps between a
parameter's gradient and its compressed [k1, k2] image.

A compressed parameter W in R^{O x I} has two sketch matrices P1 in R^{O x k1} and P2 in R^{I x k2}
with N(0, 1/k) entries (so E[P P^T] = I); a side whose width is at most its k is the identity
(``None``). ``compress`` maps G to P1^T G P2, ``decompress`` maps u back to P1 u P2^T.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

Sketch = torch.Tensor | None                        # a side's sketch matrix; None is the identity
SketchPair = tuple[Sketch, Sketch]                  # (P1 [O, k1], P2 [I, k2])
CompressSpec = Callable[[torch.Tensor], bool] | Iterable[torch.Tensor] | None

# The CPU torch.Generator (mt19937) uses only the low 32 bits of its seed, so sketch seeds are
# 32-bit and injective in (compressed index, refresh count) for a fixed base seed: the index takes
# the high _INDEX_BITS bits of the key, the refresh count the low _REFRESH_BITS bits.
_INDEX_BITS = 14
_REFRESH_BITS = 18
_MASK32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A bijection of 32-bit integers (xorshift-multiply finaliser, both multipliers odd)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def sketch_seed(base_seed: int, index: int, refresh: int) -> int:
    """The 32-bit generator seed of the sketches of compressed parameter ``index`` after ``refresh``
    refreshes. For a fixed base seed the map is injective (no two parameters or refreshes share a
    seed): the key ``index << 18 | refresh`` goes through a bijection. Limits: index < 2**14,
    refresh < 2**18 (a ValueError beyond them)."""
    if not 0 <= index < 1 << _INDEX_BITS:
        raise ValueError(f"MeSO supports at most {1 << _INDEX_BITS} compressed parameters "
                         f"(sketch index {index})")
    if not 0 <= refresh < 1 << _REFRESH_BITS:
        raise ValueError(f"MeSO supports at most {(1 << _REFRESH_BITS) - 1} sketch refreshes per "
                         f"parameter (refresh {refresh}); use a larger refresh_every")
    base = int(base_seed)
    folded = _mix32((base & _MASK32) ^ _mix32(((base >> 32) & _MASK32) ^ 0x9E3779B9))
    return _mix32(((index << _REFRESH_BITS) | refresh) ^ folded)


def draw_sketches(out_dim: int, in_dim: int, k1: int, k2: int, seed: int) -> SketchPair:
    """Gaussian sketches (P1 [out_dim, k1], P2 [in_dim, k2]) with N(0, 1/k) entries, drawn in float32
    on the CPU from one generator seeded with ``seed`` (P1 first). A side with k >= its width is the
    identity (None)."""
    gen = torch.Generator().manual_seed(int(seed))
    p1 = None if k1 >= out_dim else torch.randn(out_dim, k1, generator=gen) / math.sqrt(k1)
    p2 = None if k2 >= in_dim else torch.randn(in_dim, k2, generator=gen) / math.sqrt(k2)
    return p1, p2


def compress(grad: torch.Tensor, p1: Sketch, p2: Sketch) -> torch.Tensor:
    """The compressed gradient P1^T G P2 (identity sides skipped), cheaper association first."""
    if p1 is None and p2 is None:
        return grad
    if p1 is None:
        return grad @ p2
    if p2 is None:
        return p1.T @ grad
    o, i = grad.shape
    k1, k2 = p1.shape[1], p2.shape[1]
    if k1 * i * (o + k2) <= k2 * o * (i + k1):
        return (p1.T @ grad) @ p2
    return p1.T @ (grad @ p2)


def decompress(u: torch.Tensor, p1: Sketch, p2: Sketch) -> torch.Tensor:
    """The parameter-space direction P1 u P2^T (identity sides skipped), cheaper association first."""
    if p1 is None and p2 is None:
        return u
    if p1 is None:
        return u @ p2.T
    if p2 is None:
        return p1 @ u
    o, i = p1.shape[0], p2.shape[0]
    k1, k2 = u.shape
    if o * k2 * (k1 + i) <= k1 * i * (k2 + o):
        return (p1 @ u) @ p2.T
    return p1 @ (u @ p2.T)
