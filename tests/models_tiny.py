"""Tiny models and batches for the oracle tests.

Every builder is deterministic (its own seed), returns a float64 model in eval mode with all
dropout probabilities at 0, so a batch-size-1 oracle and a batched engine see the same function.
Weights are drawn with a larger initializer range than HF's default (0.02) so that scores have
mixed signs and are well separated.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

VOCAB = 128
PAD_ID = 0


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode; perturb norm weights away from exactly 1 so their gradients are generic."""
    g = torch.Generator().manual_seed(seed + 999)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name or name.endswith("ln_f.weight") or name.endswith("ln_f.bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


class ExactRMSNorm(nn.Module):
    """LlamaRMSNorm without its float32 round trip, so a float64 model is float64 end to end
    (HF's version casts to float32, which turns 1e-16 batch-vs-row differences into 1e-7)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_rmsnorm(model: nn.Module) -> nn.Module:
    """Swap every *RMSNorm module for ExactRMSNorm (same parameter object, same name)."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RMSNorm") and not isinstance(m, ExactRMSNorm):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], ExactRMSNorm(m.weight, m.variance_epsilon))
    return model


def llama(tied: bool = True, num_layers: int = 1, bias: bool = False, seed: int = 0, kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, attention_dropout=0.0,
                      initializer_range=0.15, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    # sdpa, not eager: HF's eager Llama attention runs its softmax in float32 (see ExactRMSNorm)
    torch.manual_seed(seed)
    return _finish(exact_rmsnorm(LlamaForCausalLM(cfg)), seed)


def gpt2(num_layers: int = 1, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=num_layers, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
                     attn_implementation="eager")
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(cfg), seed)


def lora(base: nn.Module, target_modules, seed: int = 0, fan_in_fan_out: bool = False) -> nn.Module:
    """PEFT LoRA (r=4, no dropout). lora_B is initialised randomly (init_lora_weights=False) so that
    lora_A receives a non-zero gradient; only lora_A/lora_B are trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 7)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), lora_dropout=0.0,
                     init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, cfg)
    return model.double().eval()


def llama_lora(seed: int = 0) -> nn.Module:
    return lora(llama(tied=True, seed=seed), ["q_proj", "v_proj"], seed=seed)


def gpt2_lora(seed: int = 0) -> nn.Module:
    return lora(gpt2(seed=seed), ["c_attn"], seed=seed, fan_in_fan_out=True)


class TinyLM(nn.Module):
    """A plain-PyTorch causal LM that returns a bare logits tensor: embedding with padding_idx,
    causal prefix mean, LayerNorm, two Linears with bias."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD_ID)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        h = h.cumsum(1) / steps
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyLM()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
        m.embed.weight[PAD_ID].zero_()
    return _finish(m, seed)


class SingleRowLM(nn.Module):
    """Frozen embedding -> trainable Linear(dim, 1) -> frozen Linear(1, vocab): exactly one scored
    layer, and that layer has a single output row."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 1)
        self.head = nn.Linear(1, vocab)
        self.embed.weight.requires_grad_(False)
        self.head.weight.requires_grad_(False)
        self.head.bias.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        h = h.cumsum(1) / steps
        return self.head(torch.tanh(self.proj(h)))


def single_row_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = SingleRowLM()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.double().eval()


def single_layer_llama(seed: int = 0) -> nn.Module:
    """Tiny Llama where only mlp.down_proj is trainable: a single scored layer, no other trainable
    parameter."""
    m = llama(tied=False, seed=seed)
    for name, p in m.named_parameters():
        p.requires_grad_(name == "model.layers.0.mlp.down_proj.weight")
    return m


BUILDERS = {
    "llama_tied": lambda: llama(tied=True, seed=1),
    "llama_untied_bias": lambda: llama(tied=False, bias=True, seed=2),
    "llama_2layer": lambda: llama(tied=True, num_layers=2, seed=3, kv_heads=1),   # GQA
    "gpt2": lambda: gpt2(seed=4),
    "llama_lora": lambda: llama_lora(seed=5),
    "gpt2_lora": lambda: gpt2_lora(seed=6),
    "tiny_lm": lambda: tiny_lm(seed=7),
}


# --------------------------------------------------------------------------------------------
# batches

def make_batch(n: int, seq: int, seed: int, vocab: int = VOCAB, min_len: int | None = None,
               max_prompt: int = 3, pad_id: int = PAD_ID, include_pad_token: bool = True) -> dict:
    """Random right-padded causal-LM batch: rows of different lengths, the first p_i tokens of each
    row unsupervised (labels -100), padding with attention_mask 0 and labels -100. Every row has at
    least one supervised token (labels[i, 1:] != -100). Token ``pad_id`` may also occur as a real
    token (to exercise the Embedding padding_idx row)."""
    g = torch.Generator().manual_seed(seed)
    min_len = min_len if min_len is not None else max(3, seq // 2)
    ids = torch.full((n, seq), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq), dtype=torch.long)
    labels = torch.full((n, seq), -100, dtype=torch.long)
    lengths = torch.randint(min_len, seq + 1, (n,), generator=g)
    lengths[0] = seq  # at least one full-length row
    for i in range(n):
        length = int(lengths[i])
        low = 0 if include_pad_token else 1
        row = torch.randint(low + (i % 3 != 0), vocab, (length,), generator=g)
        if include_pad_token and i % 3 == 0 and length > 3:
            row[2] = pad_id   # a real (attended, supervised) occurrence of the padding token
        ids[i, :length] = row
        mask[i, :length] = 1
        labels[i, :length] = row
        p = int(torch.randint(0, max_prompt + 1, (1,), generator=g))
        p = min(p, length - 2)  # keep >= 1 supervised token after the shift
        labels[i, :p] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cat_batches(a: dict, b: dict) -> dict:
    assert a["input_ids"].shape[1] == b["input_ids"].shape[1]
    return {k: torch.cat([a[k], b[k]]) for k in a}


def slice_batch(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}
