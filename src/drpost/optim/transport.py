"""Moment transport: carrying MeSO's Adam moments from old sketches to new ones.

Every ``refresh_every`` steps a compressed parameter draws new sketches P1', P2'
(seed derived from the base seed, the parameter's compressed index and its refresh count; see
``sketch_seed``) and its moments are carried over. With A = P1'^T P1 and B = P2'^T P2 the map from
old to new compressed gradients, C_new = A C_old B^T (decompress with the old sketch, recompress with
the new one), is M = A (x) B acting on the row-major vec(C). The first moment is transported
exactly, m' = A m B^T. For the second moment we keep the diagonal of the transported covariance
under the usual Adam independence assumption, v' = diag(M diag(v) M^T), which for a Kronecker M has
the closed form (A o A) v (B o B)^T (o: elementwise square). It is exact for that diagonal and costs
two small matrix products, so no Hutchinson estimate is needed; v' is clamped at 0 against rounding.
``transport_rescale=True`` additionally rescales m' to the Frobenius norm of m and v' to the mean of
v (i.e. keeps RMS(sqrt v)), as the reference implementation optionally did.
"""
from __future__ import annotations

import torch

from .sketches import Sketch


def transport_map(p_old: Sketch, p_new: Sketch) -> Sketch:
    """One side of the moment transport, P_new^T P_old (None when both sides are the identity)."""
    if p_old is None and p_new is None:
        return None
    if p_new is None:
        return p_old
    if p_old is None:
        return p_new.T
    return p_new.T @ p_old


def transport_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, a: Sketch, b: Sketch,
                      rescale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments carried through the compressed-gradient map M = A (x) B (None: identity).

    Returns (A m B^T, (A o A) v (B o B)^T clamped at 0), the latter being diag(M diag(v) M^T) exactly.
    With ``rescale`` the new first moment keeps the Frobenius norm of ``exp_avg`` and the new second
    moment keeps the mean of ``exp_avg_sq`` (the RMS of sqrt v)."""
    m, v = exp_avg, exp_avg_sq
    if a is not None:
        m = a @ m
        v = (a * a) @ v
    if b is not None:
        m = m @ b.T
        v = v @ (b * b).T
    m = m.clone() if m is exp_avg else m
    v = v.clamp_min(0)
    if rescale:
        m_norm = torch.linalg.vector_norm(m)
        m = m * torch.where(m_norm > 0, torch.linalg.vector_norm(exp_avg) / m_norm, m_norm.new_ones(()))
        v_mean = v.mean()
        v = v * torch.where(v_mean > 0, exp_avg_sq.mean() / v_mean, v_mean.new_ones(()))
    return m, v
