"""Layers that are trained but never scored: norm layers (LayerNorm, RMSNorm) and any other leaf
module with its own trainable parameters.

Their parameters get the plain gradient of the *general* rows (all of them, no selection); target
rows never contribute (METHOD §1.6). In a merged batch the target rows share the backward, so the
rule recomputes the module's (cheap, row-local) forward in backward and takes two vector-Jacobian
products: the full output gradient for the input, the general rows' part for the parameters.
"""
from __future__ import annotations

import torch

NORM_CLASS_HINTS = ("norm",)


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
