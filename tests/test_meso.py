"""MeSO (AdamW with sketched moments): identity sketches against torch.optim.AdamW, a compressed
step and a re-sketch against a naive oracle with explicit Kronecker matrices, the closed-form moment
transport, determinism, checkpoint round trips, the memory report, input errors, and a tiny causal
LM trained end to end (plain loop and Hugging Face Trainer)."""
import io
import math

import pytest
import torch
from torch import nn

from drpost.optim import MeSO, draw_sketches, sketch_seed, transport_map, transport_moments

HP = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 12, generator=g, dtype=dtype), torch.randn(6, 3, generator=g, dtype=dtype)


def train(model, opt, steps, start=0, sched=None):
    for t in range(start, start + steps):
        x, y = batch(t, next(model.parameters()).dtype)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).sum()       # a sum: MeSO must not rescale it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if sched is not None:
            sched.step()
    return model


def weights(model):
    return [p for p in model.parameters() if p.dim() == 2]


def assert_same_params(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------ 1. identity == AdamW

@pytest.mark.parametrize("how", ["wide_k", "explicit_identity", "all_dense"])
def test_identity_sketches_reproduce_adamw_exactly(how):
    ref, model = mlp(), mlp()
    if how == "wide_k":        # k >= every side: compressed code path, identity sketches
        opt = MeSO(model.parameters(), **HP, k1=64, compress=weights(model))
    elif how == "explicit_identity":
        opt = MeSO(model.parameters(), **HP, k1=2, sketches={p: (None, None) for p in weights(model)})
    else:                      # default selection compresses nothing at this k
        opt = MeSO(model.parameters(), **HP, k1=64)
    assert len(opt.sketches()) == (0 if how == "all_dense" else 3)
    adamw = torch.optim.AdamW(ref.parameters(), **HP, foreach=False)
    lam = lambda t: 1.0 / (1 + t)  # noqa: E731
    train(ref, adamw, 6, sched=torch.optim.lr_scheduler.LambdaLR(adamw, lam))
    train(model, opt, 6, sched=torch.optim.lr_scheduler.LambdaLR(opt, lam))
    assert opt.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] != HP["lr"]
    assert_same_params(model, ref)


def test_param_groups_and_zero_grad_behave_like_torch():
    ref, model = mlp(), mlp()
    groups = lambda m: [{"params": weights(m), "weight_decay": 0.3},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.dim() == 1], "lr": 1e-2, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups(ref), **{**HP, "weight_decay": 0.0}, foreach=False)
    opt = MeSO(groups(model), **{**HP, "weight_decay": 0.0}, k1=64, compress=weights(model))
    train(ref, adamw, 4)
    train(model, opt, 4)
    assert_same_params(model, ref)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------- 2. compressed step vs oracle

def test_compressed_steps_match_naive_oracle_with_refresh():
    """Explicit formulas: C = P1^T G P2, AdamW in sketch space, W update through P1 u P2^T, and every
    2 steps new seeded sketches with the moments moved by the dense Kronecker matrix."""
    torch.manual_seed(3)
    lin = nn.Linear(11, 9).double()
    k1, k2, b1, b2, eps, lr, wd = 3, 4, *HP["betas"], HP["eps"], HP["lr"], HP["weight_decay"]
    opt = MeSO(lin.parameters(), **HP, k1=k1, k2=k2, refresh_every=2, seed=7)
    assert opt.is_compressed(lin.weight) and not opt.is_compressed(lin.bias)
    p1, p2 = (s.clone() for s in opt.sketches()[lin.weight])
    assert torch.equal(p1, draw_sketches(9, 11, k1, k2, sketch_seed(7, 0, 0))[0].double())
    w = lin.weight.detach().clone()
    m = torch.zeros(k1, k2, dtype=torch.float64)
    v = torch.zeros_like(m)
    for t in range(1, 6):
        gen = torch.Generator().manual_seed(t)
        x, y = (torch.randn(6, d, generator=gen, dtype=torch.float64) for d in (11, 9))
        opt.zero_grad()
        (lin(x) - y).pow(2).mean().backward()
        g = lin.weight.grad.clone()
        opt.step()
        c = p1.T @ g @ p2
        m = b1 * m + (1 - b1) * c
        v = b2 * v + (1 - b2) * c * c
        u = m / ((v / (1 - b2 ** t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr / (1 - b1 ** t) * (p1 @ u @ p2.T)
        if t % 2 == 0:
            n1, n2 = (s.double() for s in draw_sketches(9, 11, k1, k2, sketch_seed(7, 0, t // 2)))
            big = torch.kron(n1.T @ p1, n2.T @ p2)
            m = (big @ m.reshape(-1)).reshape(k1, k2)
            v = torch.diagonal(big @ torch.diag(v.reshape(-1)) @ big.T).reshape(k1, k2)
            p1, p2 = n1, n2
        torch.testing.assert_close(lin.weight.detach(), w, rtol=0, atol=1e-12)
        state = opt.state[lin.weight]
        torch.testing.assert_close(state["exp_avg"], m, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-10, atol=1e-18)
        # the oracle follows the optimizer's own weights so gradients stay identical
        w = lin.weight.detach().clone()
    assert opt.state[lin.weight]["refresh"] == 2 and opt.state[lin.weight]["step"] == 5


def test_compressed_gradient_uses_dense_grad_scale_clipping_and_tied_uses():
    torch.manual_seed(0)
    emb = nn.Parameter(torch.randn(20, 8, dtype=torch.float64))
    opt = MeSO([emb], lr=1e-2, k1=4, k2=4, weight_decay=0.0)
    x = torch.randn(5, 8, dtype=torch.float64)
    ((x @ emb.T).sum() + (emb[:3] * 2).sum()).backward()       # two uses of one tensor
    torch.nn.utils.clip_grad_norm_([emb], 0.5)
    g = emb.grad.clone()
    opt.step()
    p1, p2 = opt.sketches()[emb]
    c = p1.T @ g @ p2
    torch.testing.assert_close(opt.state[emb]["exp_avg"], 0.1 * c, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------- 3. moment transport

def test_transport_closed_form_matches_explicit_kronecker():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)      # k1 3 -> 5
    b = torch.randn(2, 4, generator=g, dtype=torch.float64)      # k2 4 -> 2
    m = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v = torch.rand(3, 4, generator=g, dtype=torch.float64)
    m_new, v_new = transport_moments(m, v, a, b)
    big = torch.kron(a, b)
    torch.testing.assert_close(m_new.reshape(-1), big @ m.reshape(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_new.reshape(-1), torch.diagonal(big @ torch.diag(v.reshape(-1)) @ big.T),
                               rtol=1e-12, atol=1e-14)
    assert (v_new >= 0).all()
    # one identity side
    m1, v1 = transport_moments(m, v, None, b)
    torch.testing.assert_close(m1, m @ b.T)
    torch.testing.assert_close(v1, v @ (b * b).T)
    # rescaling keeps ||m|| and mean(v)
    m2, v2 = transport_moments(m, v, a, b, rescale=True)
    torch.testing.assert_close(torch.linalg.norm(m2), torch.linalg.norm(m))
    torch.testing.assert_close(v2.mean(), v.mean())
    torch.testing.assert_close(m2 / m2.norm(), m_new / m_new.norm())


def test_transport_map_is_decompress_recompress():
    g = torch.Generator().manual_seed(1)
    old, new = (torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(transport_map(old, new), new.T @ old)
    torch.testing.assert_close(transport_map(None, new), new.T)
    assert transport_map(old, None) is old and transport_map(None, None) is None


# ----------------------------------------------------------- 4. refresh identity, determinism

def test_refresh_with_same_orthonormal_sketch_keeps_moments():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=False).double()
    q1 = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))[0]
    opt = MeSO(lin.parameters(), **HP, sketches={lin.weight: (q1, q2)})
    for t in range(3):
        opt.zero_grad()
        lin(batch(t)[0]).pow(2).sum().backward()
        opt.step()
    m, v = (opt.state[lin.weight][k].clone() for k in ("exp_avg", "exp_avg_sq"))
    opt.refresh_sketches({lin.weight: (q1, q2)})
    assert opt.state[lin.weight]["refresh"] == 1
    torch.testing.assert_close(opt.state[lin.weight]["exp_avg"], m, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[lin.weight]["exp_avg_sq"], v, rtol=0, atol=1e-12)


def test_same_seed_is_deterministic_and_refresh_redraws():
    runs = []
    for seed in (5, 5, 6):
        model = mlp()
        opt = MeSO(model.parameters(), **HP, k1=3, k2=4, refresh_every=2, seed=seed)
        first = {id(p): s[0].clone() for p, s in opt.sketches().items()}
        train(model, opt, 5)
        runs.append(model)
        assert opt.sketches() and all(not torch.equal(first[id(p)], s[0]) for p, s in opt.sketches().items())
    assert_same_params(runs[0], runs[1])
    assert not torch.equal(runs[0][0].weight, runs[2][0].weight)


def test_sketch_seeds_are_distinct():
    seeds = {sketch_seed(0, i, r) for i in range(64) for r in range(64)}
    assert len(seeds) == 64 * 64
    assert all(0 <= s < 2 ** 32 for s in seeds)
    assert sketch_seed(0, 1, 2) != sketch_seed(1, 1, 2)
    with pytest.raises(ValueError, match="refreshes"):
        sketch_seed(0, 0, 2 ** 18)


# ------------------------------------------------------------------ 5. state_dict round trip

def _roundtrip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("external", [False, True])
def test_state_dict_round_trip_is_bitwise(external):
    def make(model, seed):
        ext = None
        if external:   # one layer with sketches from outside; the resumed optimizer is not given them
            g = torch.Generator().manual_seed(9)
            ext = {model[0].weight: (torch.randn(10, 3, generator=g, dtype=torch.float64), None)}
        return MeSO(model.parameters(), **HP, k1=3, k2=4, refresh_every=4, seed=seed,
                    sketches=ext if seed == 11 else None)

    full = mlp()
    train(full, make(full, 11), 6)
    part = mlp()
    opt = make(part, 11)
    train(part, opt, 3)
    saved = _roundtrip(opt)
    resumed_model = mlp(seed=1)
    resumed_model.load_state_dict(part.state_dict())
    resumed = make(resumed_model, 999)            # wrong seed on purpose: the checkpoint's is used
    resumed.load_state_dict(saved)
    for p, q in zip(opt.sketches().values(), resumed.sketches().values()):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(p, q))
    train(resumed_model, resumed, 3, start=3)
    assert_same_params(resumed_model, full)


def test_bf16_parameters_keep_float32_moments_through_checkpoint():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).bfloat16()
    opt = MeSO(lin.parameters(), lr=1e-2, k1=4)
    lin(torch.randn(3, 16, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    opt.step()
    assert opt.state[lin.weight]["exp_avg"].dtype == torch.float32
    assert opt.state[lin.bias]["exp_avg_sq"].dtype == torch.float32
    lin2 = nn.Linear(16, 16).bfloat16()
    opt2 = MeSO(lin2.parameters(), lr=1e-2, k1=4)
    opt2.load_state_dict(_roundtrip(opt))
    assert opt2.state[lin2.weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[lin2.weight]["exp_avg"], opt.state[lin.weight]["exp_avg"])
    assert opt2.state[lin2.weight]["step"] == 1


def test_load_rejects_mismatched_widths():
    model = mlp()
    opt = MeSO(model.parameters(), k1=3)
    train(model, opt, 1)
    with pytest.raises(ValueError, match="sketch widths"):
        MeSO(mlp().parameters(), k1=4, k2=3).load_state_dict(_roundtrip(opt))


# ------------------------------------------------------------------------- 6. memory report

def test_memory_report():
    lin = nn.Linear(256, 256, bias=False)
    rep = MeSO(lin.parameters(), k1=16, k2=16).memory_report()
    assert rep.compressed_moment_bytes == rep.moment_bytes == 2 * 16 * 16 * 4
    assert rep.adamw_moment_bytes == 2 * 256 * 256 * 4
    assert rep.sketch_bytes == 2 * 256 * 16 * 4
    assert rep.num_compressed == 1 and rep.num_dense == 0
    assert rep.ratio == pytest.approx((2 * 16 * 16 + 2 * 256 * 16) / (2 * 256 * 256))
    lin_b = nn.Linear(256, 256)
    rep_b = MeSO(lin_b.parameters(), k1=16).memory_report()
    assert rep_b.dense_moment_bytes == 2 * 256 * 4 and rep_b.adamw_compressed_bytes == 2 * 256 * 256 * 4


# ----------------------------------------------------------------------------- 7. bad input

def test_bad_input_errors():
    model = mlp()
    params = lambda: model.parameters()  # noqa: E731
    for kw, msg in [(dict(k1=0), "k1"), (dict(k1=4, k2=-1), "k2"), (dict(k1=2.5), "k1"),
                    (dict(betas=(1.0, 0.9)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
                    (dict(lr=-1.0), "learning rate"), (dict(eps=-1.0), "eps"),
                    (dict(refresh_every=-2), "refresh_every"),
                    (dict(compress=[model[0].bias]), "not 2-D"),
                    (dict(compress=lambda p: True), "not 2-D"),
                    (dict(compress=[nn.Linear(20, 20).weight]), "not among"),
                    (dict(sketches={model[0].weight: (torch.randn(9, 2), None)}), "P1"),
                    (dict(sketches={model[0].bias: (None, None)}), "not 2-D")]:
        with pytest.raises(ValueError, match=msg):
            MeSO(params(), **kw)


def test_sparse_and_nonfinite_gradients_are_named():
    emb = nn.Embedding(30, 8, sparse=True)
    opt = MeSO(emb.parameters(), k1=4)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    model = mlp()
    opt = MeSO(model.named_parameters(), k1=3)
    train(model, opt, 1)
    before = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    x, _ = batch(0)
    model(x).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="'2.weight'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # nothing was touched


# ------------------------------------------------------------------------ 8. tiny causal LM

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def test_tiny_causal_lm_loss_decreases():
    model = tiny_llama()
    opt = MeSO(model.parameters(), lr=1e-2, weight_decay=0.0, k1=16, refresh_every=10)
    assert len(opt.sketches()) == 2 * 7 + 2          # every Linear, the embedding and the LM head
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    assert opt.memory_report().ratio < 0.5


def test_hf_trainer_accepts_meso(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    opt = MeSO(model.parameters(), lr=1e-2, k1=16)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                             logging_steps=1, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert opt.state[model.model.layers[0].mlp.up_proj.weight]["step"] == 3
    assert opt.param_groups[0]["lr"] < 1e-2                # the Trainer's linear schedule drove it


# ---------------------------------------------------------------------------------- in the SFT recipe
def test_meso_in_the_sft_recipe_resumes_exactly(tmp_path):
    """drpost train with train.optimizer meso (1-layer SmolLM2, full fine-tuning): a run interrupted at
    step 2 (after a sketch refresh) and resumed ends with the same weights as a straight run."""
    from pathlib import Path

    from safetensors.torch import load_file

    from drpost.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml")
    common = ["--train.lora_r", "0", "--train.lr", "1e-4", "--train.optimizer", "meso", "--train.meso_rank", "8",
              "--train.meso_refresh", "2", "--train.save_steps", "2", "--train.save_total_limit", "1",
              "--eval.metrics", "[]", "--output_dir", str(tmp_path), "--no-progress"]
    assert main(["train", tiny, "--train.steps", "2", "--run_name", "cut", *common]) == 0
    assert main(["train", tiny, "--train.steps", "4", "--run_name", "cut", "--resume", *common]) == 0
    assert main(["train", tiny, "--train.steps", "4", "--run_name", "straight", *common]) == 0
    a = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer really was MeSO: [8, 8] moments for the compressed weights
    opt = torch.load(tmp_path / "cut" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    shapes = {tuple(st["exp_avg"].shape) for st in opt["state"].values() if "exp_avg" in st}
    assert (8, 8) in shapes
