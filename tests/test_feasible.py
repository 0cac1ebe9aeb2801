"""Selection policies as pure functions on plain tensors, against naive Python re-implementations."""
from __future__ import annotations

import math

import pytest
import torch

import oracles as O

fs = pytest.importorskip("drpost.feasible")


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


@pytest.mark.parametrize("frac", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf")])
def test_num_selected_rejects_frac(frac):
    with pytest.raises(ValueError, match="frac"):
        fs.num_selected(8, frac)


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
    assert torch.equal(s, s0) and torch.equal(gram, g0)
