"""Selection policies as pure functions on plain tensors, against naive Python re-implementations."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import drpost.feasible as fs
import oracles as O
from drpost.engine.options import DrPostOptions, OptionError


def rand_scores(seed, shape, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    if ties:   # quantise so many exact ties appear
        s = torch.round(s * 2) / 2
    return s


# ------------------------------------------------------------------------------------------
# num_selected and frac validation

@pytest.mark.parametrize("b,frac,k", [(8, 0.5, 4), (6, 0.5, 3), (5, 0.5, 2), (4, 0.1, 1), (4, 1.0, 4),
                                      (7, 0.99, 6), (1, 0.3, 1), (10, 0.25, 2), (3, 1, 3)])
def test_num_selected(b, frac, k):
    assert fs.num_selected(b, frac) == k


@pytest.mark.parametrize("b", [1, 2, 7, 10, 100, 1000])
def test_num_selected_edges(b):
    assert fs.num_selected(b, 1.0) == fs.num_selected(b, 1) == b     # frac=1: every sample
    assert fs.num_selected(b, 1e-9) == 1                             # tiny frac: at least one
    assert fs.num_selected(b, 1 / b) == 1
    assert fs.num_selected(1, 0.5) == 1


@pytest.mark.parametrize("b", [10, 100, 1000])
@pytest.mark.parametrize("hundredths", range(1, 100))
def test_num_selected_is_exact_for_decimals(b, hundredths):
    """B * frac for frac = 0.01 ... 0.99 as written: 100 * 0.29 is 28.999999999999996 in floats."""
    frac = float(f"0.{hundredths:02d}")
    assert fs.num_selected(b, frac) == max(1, b * hundredths // 100)


@pytest.mark.parametrize("b,frac,k", [(100, 0.29, 29), (100, 0.57, 57), (10, 0.3, 3), (10, 0.7, 7),
                                      (1000, 0.1, 100), (1000, 0.7, 700), (100, 0.123, 12),
                                      (1000, 0.001, 1), (1000000, 0.000123, 123),
                                      (3, 1 / 3, 1), (6, 1 / 3, 2), (9, 2 / 3, 6), (3, 2 / 3, 2),
                                      (14, 3 / 7, 6), (7, 1 / 7, 1), (10, 1 / 3, 3), (8, 1 / 3, 2)])
def test_num_selected_examples(b, frac, k):
    assert fs.num_selected(b, frac) == k


def test_frac_fraction():
    from fractions import Fraction
    assert fs.frac_fraction(0.29) == Fraction(29, 100)
    assert fs.frac_fraction(1 / 3) == Fraction(1, 3)
    assert fs.frac_fraction(1) == fs.frac_fraction(1.0) == 1
    assert fs.frac_fraction(0.1234567) == Fraction(1234567, 10 ** 7)    # 7 places: the decimal as written


@pytest.mark.parametrize("frac", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf"), True, "0.5"])
def test_frac_is_checked_by_the_options(frac):
    with pytest.raises(ValueError, match="frac"):
        fs.check_frac(frac)
    with pytest.raises(OptionError, match="frac"):
        DrPostOptions(frac=frac)


# ------------------------------------------------------------------------------------------
# top-k

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_topk_matches_naive(seed, k, ties):
    s = rand_scores(seed, (6,), ties)
    m = fs.topk_mask(s, k)
    assert m.dtype == torch.bool and m.shape == (6,)
    assert torch.equal(m, O.naive_topk(s, k))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_topk_columns_independent(seed, ties):
    s = rand_scores(seed, (7, 5), ties)
    m = fs.topk_mask(s, 3)
    assert m.shape == (7, 5)
    assert torch.equal(m, O.naive_topk(s, 3))
    assert (m.sum(0) == 3).all()


def test_topk_ties_prefer_lower_index():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    assert fs.topk_mask(s, 2).tolist() == [False, True, True, False, False, False]
    assert fs.topk_mask(torch.zeros(5), 3).tolist() == [True, True, True, False, False]
    s2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert fs.topk_mask(s2, 1).tolist() == [[True, True], [False, False], [False, False]]


def test_topk_float32_and_negative():
    s = torch.tensor([-3.0, -1.0, -2.0, -0.5], dtype=torch.float32)
    assert fs.topk_mask(s, 2).tolist() == [False, True, False, True]


def test_topk_full_is_all():
    assert fs.topk_mask(torch.randn(5), 5).all()


# ------------------------------------------------------------------------------------------
# filter

@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_filter_matches_naive(seed, frac, ties):
    s = rand_scores(seed, (9,), ties)
    assert torch.equal(fs.filter_mask(s, frac), O.naive_filter(s, frac))


@pytest.mark.parametrize("seed", range(3))
def test_filter_columns(seed):
    s = rand_scores(seed, (8, 4), ties=True)
    assert torch.equal(fs.filter_mask(s, 0.5), O.naive_filter(s, 0.5))


def test_filter_examples():
    s = torch.tensor([0.5, -1.0, 0.0, -3.0, -2.0, 2.0])
    # negatives: -3 (idx 3), -2 (idx 4), -1 (idx 1); n_neg = 3
    assert fs.filter_mask(s, 1.0).tolist() == [True, False, True, False, False, True]   # drop all negatives
    assert fs.filter_mask(s, 0.5).tolist() == [True, True, True, False, True, True]      # floor(1.5) = 1 dropped
    assert fs.filter_mask(s, 0.7).tolist() == [True, True, True, False, False, True]     # floor(2.1) = 2
    assert fs.filter_mask(s, 0.0).all()
    assert fs.filter_mask(s, 0.3).all()                                                  # floor(0.9) = 0


def test_filter_zero_is_kept_and_may_be_empty():
    assert fs.filter_mask(torch.zeros(4), 1.0).all()
    m = fs.filter_mask(torch.tensor([-1.0, -2.0, -0.1]), 1.0)
    assert m.dtype == torch.bool and not m.any()


def test_filter_ties_drop_lower_index_first():
    s = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    assert fs.filter_mask(s, 0.5).tolist() == [False, True, True, True]   # floor(1.5)=1: idx 0 dropped
    assert fs.filter_mask(s, 0.7).tolist() == [False, True, False, True]  # floor(2.1)=2: idx 0, 2


@pytest.mark.parametrize("n_neg", [10, 100, 1000])
@pytest.mark.parametrize("hundredths", [1, 7, 10, 29, 30, 57, 70, 99, 100])
def test_filter_drops_exactly(n_neg, hundredths):
    """floor(n_neg * frac) in exact arithmetic: 100 negatives at frac 0.29 drop 29, not 28."""
    frac = 1.0 if hundredths == 100 else float(f"0.{hundredths:02d}")
    s = torch.cat([-torch.arange(1.0, n_neg + 1), torch.ones(3)])
    m = fs.filter_mask(s, frac)
    n_drop = n_neg * hundredths // 100
    assert int((~m).sum()) == n_drop
    assert not m[n_neg - n_drop:n_neg].any() and m[:n_neg - n_drop].all() and m[n_neg:].all()


def test_filter_exact_per_column_and_thirds():
    # column r has 3 * (r + 1) negatives; frac 1/3 drops r + 1 of them, 2/3 drops 2 (r + 1)
    s = torch.ones(12, 4, dtype=torch.float64)
    for r in range(4):
        s[:3 * (r + 1), r] = -torch.arange(1.0, 3 * (r + 1) + 1, dtype=torch.float64)
    assert (~fs.filter_mask(s, 1 / 3)).sum(0).tolist() == [1, 2, 3, 4]
    assert (~fs.filter_mask(s, 2 / 3)).sum(0).tolist() == [2, 4, 6, 8]
    assert torch.equal(fs.filter_mask(s, 0.29), O.naive_filter(s, 0.29))


def test_filter_frac_with_many_digits_does_not_overflow():
    s = -torch.arange(1.0, 201.0)
    frac = 0.12345678901234567      # no short fraction rounds to it: read as its 17-digit decimal
    assert int((~fs.filter_mask(s, frac)).sum()) == math.floor(200 * frac) == 24


# ------------------------------------------------------------------------------------------
# greedy

@pytest.mark.parametrize("lr", [0.0, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_matches_naive(seed, k, lr):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    gram = a @ a.T
    m = fs.greedy_mask(s, gram, k, lr)
    assert m.dtype == torch.bool and int(m.sum()) == k
    assert torch.equal(m, O.naive_greedy(s, gram, k, lr))


def test_greedy_lr_zero_is_topk():
    s = rand_scores(3, (7,))
    gram = torch.eye(7, dtype=torch.float64)
    assert torch.equal(fs.greedy_mask(s, gram, 3, 0.0), fs.topk_mask(s, 3))


def test_greedy_penalises_redundant_sample():
    # samples 0 and 1 are identical and best; 2 is a bit worse but orthogonal to them
    s = torch.tensor([1.0, 1.0, 0.9, -1.0], dtype=torch.float64)
    gram = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
                        dtype=torch.float64)
    assert fs.greedy_mask(s, gram, 2, 0.0).tolist() == [True, True, False, False]
    assert fs.greedy_mask(s, gram, 2, 0.5).tolist() == [True, False, True, False]


def test_greedy_ties_lower_index():
    s = torch.zeros(4, dtype=torch.float64)
    assert fs.greedy_mask(s, torch.zeros(4, 4, dtype=torch.float64), 2, 1.0).tolist() == [True, True, False, False]


# greedy with token counts: the stated objective, against brute force

def _problem(seed, b=6, d=5, lengths=None):
    """Token-sum per-sample gradients G [B, D] (T_i tokens of gradient ~ N(mu, 1) each), the
    token-mean target gradient g_T [D], and the token counts."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 12, (b,), generator=g).double() if lengths is None else lengths.double()
    mu = torch.randn(b, d, generator=g, dtype=torch.float64)
    G = t[:, None] * mu + t.sqrt()[:, None] * torch.randn(b, d, generator=g, dtype=torch.float64)
    g_t = torch.randn(d, generator=g, dtype=torch.float64)
    return G, g_t, t


def _taylor_gain(G, g_t, t, chosen, lr):
    """L_T(0) - L_T(-lr * Delta_S) for the quadratic target loss L_T(theta) = |theta + g_T|^2 / 2
    (gradient g_T, Hessian I), Delta_S = sum_S G_i / T_S the update drpost applies."""
    if not chosen or float(t[list(chosen)].sum()) == 0:
        return 0.0
    delta = G[list(chosen)].sum(0) / t[list(chosen)].sum()
    loss = lambda theta: 0.5 * float(((theta + g_t) ** 2).sum())  # noqa: E731
    return loss(torch.zeros_like(g_t)) - loss(-lr * delta)


@pytest.mark.parametrize("lr", [0.01, 0.3, 1.0, 3.0, 30.0])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_greedy_tokens_picks_the_best_marginal_taylor_gain(seed, k, lr):
    """Every pick maximises gain(S + {j}) of one SGD step on the token-mean update, evaluated on
    the loss itself (no formula shared with the implementation)."""
    G, g_t, t = _problem(seed)
    m = fs.greedy_mask(G @ g_t, G @ G.T, k, lr, tokens=t)
    assert m.dtype == torch.bool and int(m.sum()) == k
    assert torch.equal(m, O.naive_greedy(G @ g_t, G @ G.T, k, lr, tokens=t))
    chosen = []
    for _ in range(k):   # replay the picks: each is a strict argmax here (random data, no ties)
        gains = {j: _taylor_gain(G, g_t, t, chosen + [j], lr) for j in range(6) if j not in chosen}
        best = max(gains, key=lambda j: (gains[j], -j))
        assert m[best], (chosen, gains)
        chosen.append(best)
    assert sorted(chosen) == m.nonzero().flatten().tolist()


@pytest.mark.parametrize("seed", range(6))
def test_greedy_tokens_brute_force_small_batch(seed):
    """B = 4, k = 2: the first pick is the best singleton and the pair is the best pair containing it."""
    G, g_t, t = _problem(seed, b=4)
    lr = 2.0
    m = fs.greedy_mask(G @ g_t, G @ G.T, 2, lr, tokens=t)
    first = max(range(4), key=lambda j: _taylor_gain(G, g_t, t, [j], lr))
    second = max((j for j in range(4) if j != first), key=lambda j: _taylor_gain(G, g_t, t, [first, j], lr))
    assert m.nonzero().flatten().tolist() == sorted([first, second])
    pairs = {p: _taylor_gain(G, g_t, t, list(p), lr) for p in itertools.combinations(range(4), 2)}
    assert _taylor_gain(G, g_t, t, [first, second], lr) >= min(pairs.values())


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("seed", range(8))
def test_greedy_tokens_ignores_sequence_length_scale(seed, c):
    """Every sequence c times longer with the same per-token gradients (G_i, s_i x c, K x c^2,
    T_i x c): the update drpost applies is unchanged, so is the choice."""
    G, g_t, t = _problem(seed, b=8)
    first_order = fs.greedy_mask(G @ g_t, G @ G.T, 3, 0.0, tokens=t)
    bites = 0
    for lr in (0.5, 2.0, 8.0):
        m = fs.greedy_mask(G @ g_t, G @ G.T, 3, lr, tokens=t)
        Gc = c * G
        assert torch.equal(fs.greedy_mask(Gc @ g_t, Gc @ Gc.T, 3, lr, tokens=c * t), m)
        bites += not torch.equal(m, first_order)
    assert bites > 0     # the second-order term does change the choice


def test_greedy_reference_objective_depends_on_sequence_length():
    """Why tokens are needed: without them the same scaling changes the choice for some batch."""
    changed = 0
    for seed in range(20):
        G, g_t, _ = _problem(seed, b=8)
        m = fs.greedy_mask(G @ g_t, G @ G.T, 3, 0.05)
        changed += not torch.equal(fs.greedy_mask(10 * G @ g_t, 100 * G @ G.T, 3, 0.05), m)
    assert changed > 0


def test_greedy_tokens_second_order_avoids_a_redundant_sample():
    # samples 0 and 1 are the same best direction; 2 is a bit less aligned but orthogonal to them
    G = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.9], [-1.0, 0.0]], dtype=torch.float64)
    g_t, t = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    s, gram = G @ g_t, G @ G.T
    assert fs.greedy_mask(s, gram, 2, 0.0, tokens=t).tolist() == [True, True, False, False]
    assert fs.greedy_mask(s, gram, 2, 1.0, tokens=t).tolist() == [True, False, True, False]


def test_greedy_tokens_zero_token_samples_and_ties():
    s, gram = torch.zeros(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert fs.greedy_mask(s, gram, 2, 1.0, tokens=t).tolist() == [True, True, False, False]
    # a sample without supervised tokens has G_i = 0: it adds nothing, T_S = 0 counts as gain 0
    s = torch.tensor([0.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    assert fs.greedy_mask(s, torch.zeros(4, 4, dtype=torch.float64), 1, 1.0, tokens=t).tolist() == \
        [False, True, False, False]
    with pytest.raises(ValueError, match="tokens"):
        fs.greedy_mask(s, torch.zeros(4, 4), 1, 1.0, tokens=torch.ones(3))


def test_greedy_tokens_accepts_integer_counts_and_float32():
    G, g_t, t = _problem(1)
    want = fs.greedy_mask(G @ g_t, G @ G.T, 3, 1.0, tokens=t)
    got = fs.greedy_mask((G @ g_t).float(), (G @ G.T).float(), 3, 1.0, tokens=t.long())
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------
# random

@pytest.mark.parametrize("shape,k", [((6,), 3), ((6,), 1), ((6,), 6), ((5, 7), 2)])
def test_random_counts(shape, k):
    m = fs.random_mask(shape, k, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and tuple(m.shape) == shape
    assert (m.sum(0) == k).all()


def test_random_seeded_and_varies():
    a = fs.random_mask((8,), 3, torch.Generator().manual_seed(1))
    b = fs.random_mask((8,), 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    masks = {tuple(fs.random_mask((8,), 3, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(masks) > 5


def test_random_is_uniform():
    g = torch.Generator().manual_seed(0)
    n = 3000
    counts = sum(fs.random_mask((6,), 2, g).double() for _ in range(n))
    # each index is chosen with probability 1/3; binomial std = sqrt(n * 1/3 * 2/3)
    expected, std = n / 3, math.sqrt(n * 2 / 9)
    assert ((counts - expected).abs() < 5 * std).all(), counts


def test_random_columns_independent():
    m = fs.random_mask((8, 50), 3, torch.Generator().manual_seed(0))
    assert len({tuple(m[:, r].tolist()) for r in range(50)}) > 10


# ------------------------------------------------------------------------------------------
# purity: inputs are never modified, no device knowledge needed

def test_functions_do_not_modify_inputs():
    s = rand_scores(0, (6,))
    gram = torch.eye(6, dtype=torch.float64)
    s0, g0 = s.clone(), gram.clone()
    fs.topk_mask(s, 2)
    fs.filter_mask(s, 0.5)
    fs.greedy_mask(s, gram, 3, 0.3)
    t = torch.arange(1.0, 7.0)
    fs.greedy_mask(s, gram, 3, 0.3, tokens=t)
    assert torch.equal(s, s0) and torch.equal(gram, g0) and torch.equal(t, torch.arange(1.0, 7.0))
