"""DrPostTrainer under accelerate's FSDP2 plugin (``fsdp='full_shard'``, ``fsdp_config={'version': 2}``) on a GPU.

    torchrun --nproc_per_node 1 benchmarks/gpu/accelerate_fsdp2.py --out DIR [--fsdp] [--resume CKPT]
    python benchmarks/gpu/accelerate_fsdp2.py --compare DIR_REF DIR_FSDP DIR_RESUMED

One run: the tests' tiny tied Llama (2 decoder layers, float64), 4 steps of 8 rows, a checkpoint every 2
steps, layerwise with the separate target strategy; the final parameters go to ``DIR/params.pt``.
``--compare``: the FSDP2 run equals the run without FSDP (relative error < 1e-9 per parameter), the run
resumed from the FSDP2 run's checkpoint-2 ends bit-identical to it. accelerate applies FSDP only on a
GPU, which is why this is not in the CPU test suite (tests/test_fsdp.py covers a model sharded by hand).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


def run(out: Path, fsdp: bool, resume: str | None) -> None:
    import torch

    import models_tiny as mt
    from drpost.integrations import DrPostArguments, DrPostTrainer

    extra = dict(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                 "reshard_after_forward": True}) if fsdp else {}
    args = DrPostArguments(output_dir=str(out), report_to=[], per_device_train_batch_size=8, learning_rate=1e-2,
                           max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2, seed=0,
                           disable_tqdm=True, dataloader_num_workers=0, target_batch_size=4, frac=0.5,
                           target_strategy="separate", **extra)
    args.world_size
    model = mt.llama(tied=True, num_layers=2, seed=1)

    def rows(n, seed):
        b = mt.make_batch(n, 12, seed)
        return [{k: v[i] for k, v in b.items()} for i in range(n)]

    t = DrPostTrainer(model=model, args=args, train_dataset=rows(32, 11), target_dataset=rows(16, 12))
    t.train(resume_from_checkpoint=resume)
    wrapped = t.model_wrapped if t.model_wrapped is not None else t.model
    params = {}
    for n, p in t.model.named_parameters():
        d = p.detach()
        params[n] = (d.full_tensor() if hasattr(d, "full_tensor") else d).cpu().clone()
    info = {"params": params, "reduction": type(t.regularizer._reduction).__name__,
            "losses": [r["loss"] for r in t.state.log_history if "loss" in r],
            "fsdp_modules": sorted({type(m).__name__ for m in wrapped.modules() if "FSDP" in type(m).__name__}),
            "param_types": sorted({type(p).__name__ for p in t.model.parameters()})}
    torch.save(info, out / "params.pt")
    print(out, info["reduction"], info["fsdp_modules"], info["param_types"], info["losses"])


def compare(ref: Path, sharded: Path, resumed: Path) -> int:
    import torch

    a, b, c = (torch.load(p / "params.pt", weights_only=False) for p in (ref, sharded, resumed))
    worst = max(float((b["params"][n] - p).norm() / p.norm().clamp_min(1e-30)) for n, p in a["params"].items())
    same = all(torch.equal(c["params"][n], p) for n, p in b["params"].items())
    ok = worst < 1e-9 and same and "DTensor" in b["param_types"]
    print(f"FSDP2 (accelerate) vs no FSDP: worst relative parameter error {worst:.2e}; FSDP2 reduction "
          f"{b['reduction']}, parameter types {b['param_types']}, FSDP classes {b['fsdp_modules']}; resumed from "
          f"checkpoint-2 bit-identical: {same}; losses {b['losses']} / resumed {c['losses']}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--resume")
    p.add_argument("--compare", nargs=3)
    a = p.parse_args()
    if a.compare:
        raise SystemExit(compare(*map(Path, a.compare)))
    run(Path(a.out), a.fsdp, a.resume)
