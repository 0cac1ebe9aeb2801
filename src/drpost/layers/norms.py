"""Layers that are trained but never scored: norm layers (LayerNorm, RMSNorm) and any other leaf
module with its own trainable parameters.

Their parameters get the plain gradient of the *general* rows (all of them, no selection); target
rows never contribute (METHOD §1.6). In a merged batch the target rows share the backward, so the
rule recomputes the module's (cheap) forward in backward: a row-local norm (LayerNorm, RMSNorm)
runs its general rows and its target rows separately (one vector-Jacobian product for the general
rows' input and parameter gradients, one for the target rows' input gradient); any other module
takes two products over all rows (the full output gradient for the input, the general rows' part
for the parameters).
"""
from __future__ import annotations

import torch

NORM_CLASS_HINTS = ("norm",)
# norms that normalise each row on its own (not BatchNorm): their rows can go through them separately
ROW_LOCAL_HINTS = ("layernorm", "rmsnorm")


def is_norm(module: torch.nn.Module) -> bool:
    return any(h in type(module).__name__.lower() for h in NORM_CLASS_HINTS)


class RowRestrictedRule:
    kind = "row_restricted"

    def __init__(self, module: torch.nn.Module):
        self.module = module
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def capture_input(self, args, kwargs):
        if len(args) != 1 or kwargs:
            raise ValueError(f"{type(self.module).__name__} is called with several inputs; drpost can only "
                             "restrict the gradient of single-input leaf modules. Use target_strategy='separate'.")
        return args[0]

    def backward(self, x, d, autocast_state, general_rows: int | None):
        """Return (input gradient, {param: raw general-rows gradient})."""
        # the module's parameters as its forward uses them: under FSDP2 the unsharded tensors, not the
        # sharded ones in self.params (which key the result)
        used = [getattr(self.module, n) for n in self.names]
        device_type, enabled, dtype = autocast_state
        if general_rows is None:
            general_rows = x.shape[0]
        if not self.row_local and general_rows < x.shape[0]:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                xr = x.detach().requires_grad_(x.requires_grad)
                y = self.module.forward(xr)
            return self._two_products(xr, y, d, used, general_rows)
        # a row-local norm (LayerNorm, RMSNorm): the general rows' forward gives their input gradient and
        # the parameter gradient in one vector-Jacobian product; the target rows need the input gradient only
        need_x = x.requires_grad
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            xg = x[:general_rows].detach().requires_grad_(need_x)
            yg = self.module.forward(xg)
        grads = torch.autograd.grad(yg, ([xg] if need_x else []) + used, d[:general_rows], allow_unused=True)
        grad_x = None
        if need_x:
            grad_x, grads = grads[0], grads[1:]
            if general_rows < x.shape[0]:
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    xt = x[general_rows:].detach().requires_grad_()
                    yt = self.module.forward(xt)
                (grad_t,) = torch.autograd.grad(yt, xt, d[general_rows:])
                grad_x = torch.cat([grad_x, grad_t])
        return grad_x, {p: (g if g is not None else torch.zeros_like(u)) for p, u, g in zip(self.params, used, grads)}

    @property
    def row_local(self) -> bool:
        """Does every row of the output depend on its own input row only?"""
        name = type(self.module).__name__.lower()
        return any(h in name for h in ROW_LOCAL_HINTS)

    def _two_products(self, xr, y, d, used, general_rows: int):
        """Any other module: the full output gradient for the input, the general rows' part (target
        rows zeroed) for the parameters."""
        grad_x = None
        if xr.requires_grad:
            (grad_x,) = torch.autograd.grad(y, xr, d, retain_graph=True)
        dg = d.clone()
        dg[general_rows:] = 0
        grads = torch.autograd.grad(y, used, dg, allow_unused=True)
        return grad_x, {p: (g if g is not None else torch.zeros_like(u)) for p, u, g in zip(self.params, used, grads)}
