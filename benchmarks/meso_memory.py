"""Optimizer-state memory of MeSO against AdamW on SmolLM2-135M-Instruct (full fine-tuning).

    .venv/bin/python benchmarks/meso_memory.py [--ranks 16,64,256] [--out docs/performance]

Counts bytes (MeSO.memory_report: moments, sketch matrices; AdamW: two fp32 moments per
trainable element); no training. The embedding (tied with the LM head) is trainable here, as in
``drpost bench``; recipes freeze it by default, which removes 28 M parameters from both columns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from drpost.models import load_model
    from drpost.optim import MeSO

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="16,64,256")
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance"))
    args = ap.parse_args()
    model, _ = load_model("smollm2")
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for k in (int(r) for r in args.ranks.split(",")):
        rep = MeSO(named, lr=1e-5, k1=k).memory_report().to_dict()
        rows.append({"rank": k, **rep})
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meso_memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
