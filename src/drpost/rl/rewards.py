"""Reward functions and advantage estimators.

A reward function has TRL's signature: ``fn(prompts, completions, **columns) -> list[float]``,
one float per completion; ``columns`` are the per-completion values of the prompt rows' extra
fields (e.g. ``answer``). Several functions are summed with weights. Every value is checked:
a function that raises, returns the wrong number of values, a non-number, NaN or inf gives a
:class:`RewardError` naming the function and the offending completion.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Sequence

import torch

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable."""


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def call_rewards(fns: Sequence[RewardFn], prompts: list[str], completions: list[str],
                 weights: Sequence[float] | None = None, **columns) -> tuple[torch.Tensor, dict]:
    """Sum of ``weights[k] * fns[k](...)`` per completion, float64 [N], and each function's mean."""
    if callable(fns):
        fns = [fns]
    if not fns:
        raise RewardError("no reward function given")
    weights = [1.0] * len(fns) if weights is None else list(weights)
    if len(weights) != len(fns):
        raise RewardError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"{len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if len(v) != n:
            raise RewardError(f"column {k!r} has {len(v)} values for {n} completions")
    total = torch.zeros(n, dtype=torch.float64)
    means = {}
    for fn, w in zip(fns, weights):
        name = _name(fn)
        try:
            out = fn(prompts=list(prompts), completions=list(completions), **columns)
        except Exception as err:
            raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
        try:
            values = list(out)
        except TypeError:
            raise RewardError(f"reward function {name!r} must return a list of floats, got "
                              f"{type(out).__name__}") from None
        if len(values) != n:
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) and not (
                    isinstance(v, torch.Tensor) and v.numel() == 1):
                raise RewardError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for completion "
                                  f"{i}; rewards must be numbers")
            if not math.isfinite(float(v)):
                raise RewardError(f"reward function {name!r} returned {float(v)} for completion {i} "
                                  f"({completions[i][:60]!r}); rewards must be finite")
        vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        means[name] = float(vals.mean())
        total += float(w) * vals
    return total, means


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """GRPO: (r - mean of its group) / (std of its group + eps); groups are consecutive rows.
    A group whose rewards are all equal gets advantage 0 (it carries no learning signal)."""
    r = _grouped(rewards, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True, unbiased=True) + eps) if group_size > 1 else adv
    return adv.flatten()


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other k-1 completions of the same prompt."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (rl.group_size >= 2)")
    r = _grouped(rewards, group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).flatten()


def zscore_rewards(rewards: torch.Tensor, eps: float = 1e-6, fallback_center: float = 0.5) -> torch.Tensor:
    """The ``reward`` target loss's weights (METHOD §1.2): the batch z-score of the raw rewards; when
    every reward is equal (zero variance) the fallback is r - 0.5, as in the reference RLVR code
    (for 0/1 rewards: +0.5 for an all-correct batch, -0.5 for an all-wrong one)."""
    r = rewards.to(torch.float64)
    if r.numel() < 2:
        return r - fallback_center
    std = r.std(unbiased=False)
    if float(std) <= eps:
        return r - fallback_center
    return (r - r.mean()) / std


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.to(torch.float64).view(-1, group_size)


# ------------------------------------------------------------------ checked reward functions (TRL trainers)
def _preview(x, n: int = 60) -> str:
    text = x if isinstance(x, str) else repr(x)
    return repr(text[:n] + ("..." if len(text) > n else ""))


def _check_rewards(name: str, out, prompts, completions):
    try:
        values = list(out)
    except TypeError:
        raise RewardError(f"reward function {name!r} must return a list of floats (one per completion), got "
                          f"{type(out).__name__}") from None
    for i, v in enumerate(values):
        if v is None:
            continue   # TRL: "not applicable to this completion"
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1)):
            raise RewardError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for row {i} (prompt "
                              f"{_preview(prompts[i])}); rewards must be numbers, or None where the function does "
                              "not apply")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {name!r} returned {float(v)} for row {i} (prompt "
                              f"{_preview(prompts[i])}, completion {_preview(completions[i])}); rewards must be "
                              "finite: fix the function, or return None where it does not apply")
    return out


def checked_reward_function(fn, name: str):
    """``fn`` wrapped so that an exception or a NaN/inf value becomes a RewardError naming it and the row."""
    from trl.trainer.utils import is_async_callable

    def failed(err, prompts):
        return RewardError(f"reward function {name!r} raised {type(err).__name__}: {err} (on a batch of "
                           f"{len(prompts)} completions, first prompt {_preview(prompts[0]) if prompts else None}); "
                           "fix the function or the dataset columns it reads")

    if is_async_callable(fn):
        async def wrapped(prompts, completions, **kw):
            try:
                out = await fn(prompts=prompts, completions=completions, **kw)
            except RewardError:
                raise
            except Exception as err:
                raise failed(err, prompts) from err
            return _check_rewards(name, out, prompts, completions)
    else:
        def wrapped(prompts, completions, **kw):
            try:
                out = fn(prompts=prompts, completions=completions, **kw)
            except RewardError:
                raise
            except Exception as err:
                raise failed(err, prompts) from err
            return _check_rewards(name, out, prompts, completions)
    try:
        functools.update_wrapper(wrapped, fn)
    except (AttributeError, TypeError):
        pass
    wrapped.__name__ = name
    return wrapped
