"""A randomly initialised model of a checkpoint's architecture, for timing where its weights cannot travel.

    python benchmarks/gpu/random_model.py CONFIG_DIR OUT_DIR

CONFIG_DIR holds a Hugging Face ``config.json`` and the tokenizer files (for SmolLM2-135M-Instruct,
``benchmarks/gpu/run.sh kit`` copies them out of the converted checkpoint: 3.5 MB instead of 540 MB of weights); OUT_DIR
receives the model (float32, the config's own initialiser, seed 0) and the tokenizer, loadable by
``drpost.models.load_model``. A step's cost depends on the shapes, not on the weights' values.
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = AutoConfig.from_pretrained(src, local_files_only=True)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
dst.mkdir(parents=True, exist_ok=True)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json" and f.is_file():
        shutil.copy(f, dst / f.name)
print(f"{dst}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
