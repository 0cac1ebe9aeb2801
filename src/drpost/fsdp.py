"""Sharding a model with FSDP2 the way accelerate and torchtune do: ``fully_shard`` on every decoder
layer, then on the root (the embedding, final norm and a tied lm_head stay in the root's unit).

``DataRegularizer`` accepts the result as is (:mod:`drpost.engine.reduce_fsdp`); ``drpost train``
applies it with ``train.fsdp: true`` under ``torchrun``.
"""
from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks: the ``nn.ModuleList`` named ``layers`` / ``h`` / ``blocks``
    (Llama, SmolLM, Qwen, Mistral: ``model.layers``; GPT-2: ``transformer.h``), PEFT-wrapped or not."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers named layers/h/blocks: apply "
                     "torch.distributed.fsdp.fully_shard to its blocks and then to the model yourself")


def shard_model(model: torch.nn.Module, mesh=None, **fsdp_kwargs) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root, in place; ``mesh`` defaults to a 1-D mesh
    over the world (torch.distributed must be initialised); ``fsdp_kwargs`` go to ``fully_shard``
    (``mp_policy``, ``reshard_after_forward``, ...)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("FSDP needs torch.distributed: launch with torchrun (several processes) so that the "
                         "process group is initialised before the model is sharded")
    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
