"""Naive float64 oracles for the engine (Opacus-style "micro-batch" reference).

Everything here is deliberately simple and independent of drpost: per-sample gradients come from
one forward/backward per row (batch size 1), scores are explicit Frobenius inner products, and
the selection rules are re-implemented with Python loops.

Notation follows the engine contract: G_i = grad of the token-SUM loss of row i; T_i = number of
supervised tokens of row i; g_T = sum_v G_v / sum_v T_v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


# ------------------------------------------------------------------------------------------
# model and loss

def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out


def causal_token_losses(logits: torch.Tensor, batch: dict):
    """Default causal-LM loss (HF shift): token losses [N, T-1] and mask [N, T-1]."""
    labels = batch["labels"][:, 1:]
    lg = logits[:, :-1]
    losses = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(labels.shape)
    return losses, labels != IGNORE


def token_counts(batch: dict, model: nn.Module | None = None, loss_fn=None) -> torch.Tensor:
    if loss_fn is None:
        return (batch["labels"][:, 1:] != IGNORE).sum(1).to(torch.float64)
    with torch.no_grad():
        _, mask = loss_fn(logits_of(model, batch), batch)
    return mask.sum(1).to(torch.float64)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter for trainable params (shared params once, under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch_token_mean_loss(model: nn.Module, batch: dict, loss_fn=None) -> torch.Tensor:
    lf = loss_fn or causal_token_losses
    losses, mask = lf(logits_of(model, batch), batch)
    return (losses * mask).sum() / mask.sum()


def plain_grads(model: nn.Module, batch: dict, loss_fn=None) -> dict[str, torch.Tensor]:
    """Gradient of the token-mean loss of the whole batch (one ordinary backward)."""
    params = trainable(model)
    loss = batch_token_mean_loss(model, batch, loss_fn)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


def hf_plain_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Plain ``model(**batch).loss.backward()`` for HF models (their own shift and token mean)."""
    for p in model.parameters():
        p.grad = None
    model(**batch).loss.backward()
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in trainable(model).items()}
    for p in model.parameters():
        p.grad = None
    return out


def per_sample_grads(model: nn.Module, batch: dict, loss_fn=None, unpad: bool = False):
    """G_i for every row (token-sum loss of row i alone, batch size 1), and T_i.

    Returns (list over rows of {param name: grad}, T [N] float64)."""
    params = trainable(model)
    lf = loss_fn or causal_token_losses
    out, counts = [], []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if unpad:
            length = int(row["attention_mask"].sum())
            row = {k: v[:, :length] for k, v in row.items()}
        losses, mask = lf(logits_of(model, row), row)
        loss = (losses * mask).sum()
        counts.append(float(mask.sum()))
        if mask.sum() == 0:
            out.append({n: torch.zeros_like(p) for n, p in params.items()})
            continue
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append({n: (g.detach() if g is not None else torch.zeros_like(p))
                    for (n, p), g in zip(params.items(), grads)})
    return out, torch.tensor(counts, dtype=torch.float64)


# ------------------------------------------------------------------------------------------
# layers

@dataclass
class Layer:
    name: str
    params: list[str]                       # canonical parameter names (deduplicated)
    row_dim: dict[str, int] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)


def expected_layers(model: nn.Module, scored_types: dict | None = None) -> tuple[list[Layer], list[str]]:
    """The contract's layers: every nn.Linear / Conv1D / nn.Embedding with own trainable params;
    modules sharing a parameter form one layer named 'a+b' (named_modules order). Returns the layers
    (in named_modules order of their first module) and the names of the non-scored trainable params.
    ``scored_types`` adds module types a test registered a rule for: {type: {own param name: row axis}}."""
    conv1d = _conv1d_type()
    scored_types = scored_types or {}
    canon = {}
    for n, p in model.named_parameters():
        canon.setdefault(id(p), n)
    groups: list[dict] = []
    for mname, m in model.named_modules():
        custom = next((axes for t, axes in scored_types.items() if isinstance(m, t)), None)
        if custom is None and not isinstance(m, (nn.Linear, conv1d, nn.Embedding)):
            continue
        own = [(pn, p) for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = "conv1d" if isinstance(m, conv1d) else ("embedding" if isinstance(m, nn.Embedding) else "linear")
        kind = "custom" if custom is not None else kind
        ids = {id(p) for _, p in own}
        rd = {}
        for pn, p in own:
            rd[canon[id(p)]] = custom[pn] if custom is not None else (1 if (kind == "conv1d" and pn == "weight") else 0)
        hit = [g for g in groups if g["ids"] & ids]
        if hit:
            g = hit[0]
            for other in hit[1:]:
                g["modules"] += other["modules"]
                g["ids"] |= other["ids"]
                g["row_dim"].update(other["row_dim"])
                g["kinds"] += other["kinds"]
                groups.remove(other)
            g["modules"].append(mname)
            g["ids"] |= ids
            for k, v in rd.items():
                g["row_dim"].setdefault(k, v)
            g["kinds"].append(kind)
        else:
            groups.append({"modules": [mname], "ids": ids, "row_dim": rd, "kinds": [kind]})
    layers = []
    scored = set()
    for g in groups:
        names = [n for n in canon.values() if n in g["row_dim"]]
        scored |= set(names)
        layers.append(Layer("+".join(g["modules"]), names, g["row_dim"], g["kinds"]))
    rest = [n for n in trainable(model) if n not in scored]
    return layers, rest


# ------------------------------------------------------------------------------------------
# scores

def dot(a: dict, b: dict, names) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in names))


def layer_rows(G: dict, layer: Layer) -> torch.Tensor:
    """[R, *] view of a layer's gradient with output rows first (weight and bias together)."""
    parts = []
    for n in layer.params:
        t = G[n].double().movedim(layer.row_dim[n], 0)
        parts.append(t.reshape(t.shape[0], -1))
    return torch.cat(parts, 1)


class Oracle:
    """All oracle quantities for one model, one general batch and one target batch."""

    def __init__(self, model: nn.Module, general: dict, target: dict, loss_fn=None, scored_types: dict | None = None):
        self.layers, self.rest = expected_layers(model, scored_types)
        self.names = [layer.name for layer in self.layers]
        self.by_name = {layer.name: layer for layer in self.layers}
        self.G, self.T = per_sample_grads(model, general, loss_fn)
        Gv, self.Tv = per_sample_grads(model, target, loss_fn)
        self.B = len(self.G)
        self.params = list(trainable(model))
        self.gT = {n: sum(g[n] for g in Gv) / self.Tv.sum() for n in self.params}
        self.general, self.target, self.loss_fn = general, target, loss_fn
        self.scores = {}
        self.row_scores = {}
        self.gram = {}
        self.sample_norms = {}
        self.target_norm = {}
        for layer in self.layers:
            self.scores[layer.name] = torch.tensor([dot(g, self.gT, layer.params) for g in self.G],
                                                   dtype=torch.float64)
            tr = layer_rows(self.gT, layer)
            self.row_scores[layer.name] = torch.stack([(layer_rows(g, layer) * tr).sum(1) for g in self.G])
            flat = torch.stack([torch.cat([g[n].double().reshape(-1) for n in layer.params]) for g in self.G])
            self.gram[layer.name] = flat @ flat.T
            self.sample_norms[layer.name] = flat.norm(dim=1)
            self.target_norm[layer.name] = torch.cat([self.gT[n].double().reshape(-1) for n in layer.params]).norm()

    # -- normalisation ----------------------------------------------------------------------
    def normalised(self, name: str, how: str, rows: bool = False) -> torch.Tensor:
        s = self.row_scores[name] if rows else self.scores[name]
        if how == "none":
            return s
        if how == "per_token":
            t = self.T.view(-1, *([1] * (s.dim() - 1)))
            return torch.where(t > 0, s / t.clamp_min(1), torch.zeros_like(s))
        if how == "cosine":
            assert not rows
            den = self.sample_norms[name] * self.target_norm[name]
            return torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(s))
        raise ValueError(how)

    def global_scores(self, how: str = "none") -> torch.Tensor:
        return sum(self.normalised(n, how) for n in self.names)

    def global_gram(self) -> torch.Tensor:
        return sum(self.gram[n] for n in self.names)

    # -- gradients ----------------------------------------------------------------------------
    def chosen_grad(self, pname: str, mask: torch.Tensor, row_dim: int = 0) -> torch.Tensor:
        """sum_{i in S} G_i / T_S for mask [B]; per row for mask [B, R]."""
        mask = mask.to(torch.bool)
        if mask.dim() == 1:
            tok = float(self.T[mask].sum())
            if not bool(mask.any()) or tok == 0:
                return torch.zeros_like(self.G[0][pname])
            return sum(self.G[i][pname] for i in range(self.B) if mask[i]) / tok
        stacked = torch.stack([g[pname].movedim(row_dim, 0) for g in self.G])   # [B, R, ...]
        tok = (mask.double() * self.T.view(-1, 1)).sum(0)                        # [R]
        w = torch.where(tok > 0, mask.double() / tok.clamp_min(1e-300), torch.zeros_like(tok))
        rows = torch.einsum("br,br...->r...", w.to(stacked.dtype), stacked)
        return rows.movedim(0, row_dim)

    def all_rows_grad(self, pname: str) -> torch.Tensor:
        return sum(g[pname] for g in self.G) / self.T.sum()

    def expected_grads(self, masks: dict) -> dict:
        """Full expected .grad of every trainable param given per-layer masks ([B] or [B, R])."""
        out = {}
        for layer in self.layers:
            m = masks[layer.name]
            for n in layer.params:
                out[n] = self.chosen_grad(n, m, layer.row_dim[n])
        for n in self.rest:
            out[n] = self.all_rows_grad(n)
        return out


# ------------------------------------------------------------------------------------------
# naive selection rules (independent of drpost.feasible)

def naive_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dim() == 2:
        return torch.stack([naive_topk(scores[:, r], k) for r in range(scores.shape[1])], 1)
    vals = scores.tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    mask = torch.zeros(len(vals), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def naive_filter(scores: torch.Tensor, frac: float) -> torch.Tensor:
    if scores.dim() == 2:
        return torch.stack([naive_filter(scores[:, r], frac) for r in range(scores.shape[1])], 1)
    vals = scores.tolist()
    neg = sorted([i for i, v in enumerate(vals) if v < 0], key=lambda i: (vals[i], i))
    n_drop = math.floor(len(neg) * written_fraction(frac))
    mask = torch.ones(len(vals), dtype=torch.bool)
    mask[neg[:n_drop]] = False
    return mask


def greedy_gain(scores, gram, tokens, chosen, lr: float) -> float:
    """gain(S) / eta = sum_S s_i / T_S - eta/2 sum_{i,j in S} K_ij / T_S^2 (0 when T_S = 0), in
    Python floats: the objective greedy_mask states for per-sample token counts."""
    t = sum(float(tokens[i]) for i in chosen)
    if t <= 0:
        return 0.0
    first = sum(float(scores[i]) for i in chosen) / t
    return first - 0.5 * lr * sum(float(gram[i, j]) for i in chosen for j in chosen) / t ** 2


def _greedy_steps(scores, gram, k, lr, tokens):
    """[(candidate values, pick)] of each greedy step (the reference rule when tokens is None)."""
    u, chosen, steps = [float(v) for v in scores], [], []
    for _ in range(k):
        if tokens is not None:
            u = [greedy_gain(scores, gram, tokens, chosen + [i], lr) for i in range(len(u))]
        free = [i for i in range(len(u)) if i not in chosen]
        best = max(free, key=lambda i: (u[i], -i))
        steps.append(([u[i] for i in free], best))
        chosen.append(best)
        if tokens is None:
            u = [u[i] - lr * float(gram[best, i]) for i in range(len(u))]
    return chosen, steps


def naive_greedy(scores: torch.Tensor, gram: torch.Tensor, k: int, lr: float, tokens=None) -> torch.Tensor:
    chosen, _ = _greedy_steps(scores, gram, k, lr, tokens)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[chosen] = True
    return mask


def greedy_margins(scores: torch.Tensor, gram: torch.Tensor, k: int, lr: float, tokens=None) -> float:
    """Smallest relative gap between the best and second-best candidate over the k greedy steps."""
    _, steps = _greedy_steps(scores, gram, k, lr, tokens)
    worst = math.inf
    scale = max(abs(v) for v in steps[0][0]) or 1.0
    for cand, _ in steps:
        cand = sorted(cand, reverse=True)
        if len(cand) > 1:
            worst = min(worst, (cand[0] - cand[1]) / scale)
    return worst


def topk_gap(scores: torch.Tensor, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th largest value (inf when k == B)."""
    v = torch.sort(scores.double(), descending=True).values
    if k >= v.numel():
        return math.inf
    scale = float(v.abs().max()) or 1.0
    return float(v[k - 1] - v[k]) / scale


def filter_gap(scores: torch.Tensor, frac: float) -> float:
    """How far the decision of filter_mask is from flipping under a small perturbation."""
    s = scores.double()
    scale = float(s.abs().max()) or 1.0
    nonzero = s[s != 0]   # exact zeros are structural (e.g. no shared token) and are kept (s >= 0)
    gaps = [float(nonzero.abs().min()) / scale if nonzero.numel() else math.inf]   # sign decisions
    neg = torch.sort(s[s < 0]).values
    n_drop = math.floor(neg.numel() * written_fraction(frac))
    if 0 < n_drop < neg.numel():
        gaps.append(float(neg[n_drop] - neg[n_drop - 1]) / scale)
    return min(gaps)


def written_fraction(frac: float) -> Fraction:
    """The fraction a user meant by float frac: the smallest denominator q <= 10**6 with a
    numerator p such that p / q rounds to frac (29/100 for 0.29, 1/3 for 1/3), else the decimal repr."""
    for q in range(1, 10 ** 6 + 1):
        p = round(frac * q)
        if p / q == frac:
            return Fraction(p, q)
    return Fraction(repr(frac))


def num_selected(b: int, frac: float) -> int:
    return max(1, min(b, math.floor(b * written_fraction(frac))))


# ------------------------------------------------------------------------------------------
# comparisons

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(b.abs().max()) if b.numel() else 0.0
    num = float((a - b).abs().max()) if b.numel() else 0.0
    if den == 0.0:
        return num
    return num / den


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-6):
    assert actual is not None, f"{what}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}\nactual={actual.flatten()[:8]}\nexpected={expected.flatten()[:8]}"


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in trainable(model).items()}


def assert_grads(model: nn.Module, expected: dict, what: str = "", base: dict | None = None, tol: float = 1e-6):
    got = grads_of(model)
    assert set(got) == set(expected), f"{what}: parameter sets differ"
    for n, e in expected.items():
        g = got[n]
        if base is not None and base.get(n) is not None:
            e = e + base[n]
        if g is None:
            assert float(e.abs().max()) == 0.0, f"{what}: {n}.grad is None but the expected gradient is non-zero"
            continue
        assert_close(g, e, f"{what} grad of {n}", tol)
