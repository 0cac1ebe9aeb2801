"""Layers that are trained but never scored: norm layers (LayerNorm, RMSNorm) and any other leaf
module with its own trainable parameters.

Their parameters get the plain gradient of the *general* rows (all of them, no selection); target
rows never contribute (METHOD §1.6). In a merged batch the target rows share the backward, so the
rule recomputes the module's (cheap, row-local) forward in backward and takes two vector-Jacobian
products: the full output gradient for the input, the general rows' part for the parameters.

RMSNorm (``weight * x / rms(x)``) and LayerNorm (``weight * (x - mean) / std + bias``) over the last
dimension have both gradients in closed form, without the recomputed graph (3-4x cheaper on a 2-core
CPU at SmolLM2's width): :class:`ClosedForm`. A module is given the closed form only where its
structure says RMSNorm or LayerNorm *and* the formula reproduces the module's own autograd gradients
on a probe input (once per module, dtypes and autocast state); any variant that differs (Gemma's
``1 + weight``, a norm computed in another precision, an offset), and a parameter with a gradient hook
(``register_hook``: autograd alone runs it), keeps the recomputation.
"""
from __future__ import annotations

import torch

NORM_CLASS_HINTS = ("norm",)


def is_norm(module: torch.nn.Module) -> bool:
    return any(h in type(module).__name__.lower() for h in NORM_CLASS_HINTS)


class ClosedForm:
    """The gradients of an RMSNorm (``kind="rms"``) or LayerNorm (``"layer"``) over the last dimension,
    in closed form, computed in at least float32. ``x̂`` is the normalised input, ``g = d * weight``:

    * RMSNorm: ``dx = r (g - x̂ mean(g x̂))`` with ``r = 1 / rms(x)``; ``dweight = sum d x̂``;
    * LayerNorm: ``dx = r (g - mean(g) - x̂ mean(g x̂))`` with ``r = 1 / std(x)``; ``dweight = sum d x̂``,
      ``dbias = sum d``.
    """

    def __init__(self, kind: str, eps: float | None):
        self.kind = kind
        self.eps = None if eps is None else float(eps)   # None: the input dtype's machine epsilon

    @staticmethod
    def of(module: torch.nn.Module) -> "ClosedForm | None":
        """The candidate closed form of ``module`` from its structure, or None."""
        name = type(module).__name__.lower()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return None
        own = {n for n, _ in module.named_parameters(recurse=False)}
        if "rmsnorm" in name and own == {"weight"}:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if eps is None:    # torch.nn.RMSNorm(eps=None): the dtype's machine epsilon (resolved per call)
                return ClosedForm("rms", None) if isinstance(module, getattr(torch.nn, "RMSNorm", ())) else None
            return ClosedForm("rms", eps) if isinstance(eps, (int, float)) else None
        if isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1 and own <= {"weight", "bias"}:
            return ClosedForm("layer", module.eps)
        return None

    def grads(self, x, d, weight, general_rows: int | None, need_x: bool, names):
        """(input gradient or None, [gradient of each of ``names``] over the general rows)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.no_grad():
            xf, df, w = x.detach().to(dt), d.to(dt), weight.detach().to(dt)
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            if self.kind == "layer":
                xf = xf - xf.mean(-1, keepdim=True)
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            xh = xf * r
            grad_x = None
            if need_x:
                g = df * w
                inner = g - xh * (g * xh).mean(-1, keepdim=True)
                if self.kind == "layer":
                    inner = inner - g.mean(-1, keepdim=True)
                grad_x = (r * inner).to(x.dtype)
            dg, xg = (df, xh) if general_rows is None else (df[:general_rows], xh[:general_rows])
            dg, xg = dg.reshape(-1, dg.shape[-1]), xg.reshape(-1, xg.shape[-1])
            out = {"weight": lambda: (dg * xg).sum(0), "bias": lambda: dg.sum(0)}
            return grad_x, [out[n]().to(weight.dtype) for n in names]


_CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


class RowRestrictedRule:
    kind = "row_restricted"

    def __init__(self, module: torch.nn.Module):
        self.module = module
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.closed = ClosedForm.of(module)
        self._closed_ok: dict = {}   # (input dtype, weight dtype, device, autocast state) -> probe verdict

    def _closed_form_holds(self, x, weight, autocast_state) -> bool:
        """Whether the closed form gives this module's own autograd gradients (checked on a probe input
        once per dtypes and autocast state; rounding-level differences allowed)."""
        key = (x.dtype, weight.dtype, x.device.type, autocast_state)
        if key not in self._closed_ok:
            self._closed_ok[key] = self._probe(x, weight, autocast_state)
        return self._closed_ok[key]

    def _probe(self, x, weight, autocast_state) -> bool:
        gen = torch.Generator().manual_seed(0)
        shape = (3, 2, x.shape[-1])
        xp = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(x.device, x.dtype)
        dp = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
        try:
            want_x, want = self._autograd(xp.requires_grad_(), dp, autocast_state, 2)
        except Exception:      # noqa: BLE001 -- a module the probe cannot drive: keep the recomputation
            return False
        got_x, got = self.closed.grads(xp, dp, weight, 2, True, self.names)
        tol = _CHECK_TOL.get(x.dtype, 2e-2)

        def close(a, b):
            a, b = a.double(), b.double()
            return bool(((a - b).norm() <= tol * b.norm().clamp_min(1e-30)).item())
        return close(got_x, want_x) and all(close(g, want[p]) for g, p in zip(got, self.params))

    def capture_input(self, args, kwargs):
        if len(args) != 1 or kwargs:
            raise ValueError(f"{type(self.module).__name__} is called with several inputs; drpost can only "
                             "restrict the gradient of single-input leaf modules. Use target_strategy='separate'.")
        return args[0]

    def backward(self, x, d, autocast_state, general_rows: int | None):
        """Return (input gradient, {param: raw general-rows gradient})."""
        if self.closed is not None:
            # the module's parameters as its forward used them: under FSDP2 the unsharded tensors
            used = [getattr(self.module, n) for n in self.names]
            weight = getattr(self.module, "weight")
            # a gradient hook on a parameter runs only in autograd: keep the recomputation for it
            hooked = any(getattr(u, "_backward_hooks", None) for u in used)
            if not hooked and self._closed_form_holds(x, weight, autocast_state):
                grad_x, grads = self.closed.grads(x, d, weight, general_rows, x.requires_grad, self.names)
                return grad_x, {p: g.view_as(u) for p, u, g in zip(self.params, used, grads)}
        return self._autograd(x, d, autocast_state, general_rows)

    def _autograd(self, x, d, autocast_state, general_rows: int | None):
        """The recomputation: the module's forward again, then two vector-Jacobian products."""
        device_type, enabled, dtype = autocast_state
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            xr = x.detach().requires_grad_(x.requires_grad)
            y = self.module.forward(xr)
        grad_x = None
        if x.requires_grad:
            (grad_x,) = torch.autograd.grad(y, xr, d, retain_graph=True)
        dg = d
        if general_rows is not None:
            dg = d.clone()
            dg[general_rows:] = 0
        # the module's parameters as its forward used them: under FSDP2 the unsharded tensors, not the
        # sharded ones in self.params (which key the result)
        used = [getattr(self.module, n) for n in self.names]
        grads = torch.autograd.grad(y, used, dg, allow_unused=True)
        return grad_x, {p: (g if g is not None else torch.zeros_like(u)) for p, u, g in zip(self.params, used, grads)}
