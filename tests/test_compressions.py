"""techniques.compressions: each C step against brute force, and their additive combination."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfhybrid.techniques import compressions as c

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


def brute_force_kmeans(x: np.ndarray, k: int) -> float:
    """The least squared error of k contiguous clusters of sorted `x`, over all splits."""
    x = np.sort(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, x.size), k - 1):
        parts = np.split(x, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.integers(2, 9), elements=finite), st.integers(2, 4))
@example(np.array([-1.0, -1.0, 7.19086677e-38, 0.0]), 3)  # too close for prefix sums
def test_kmeans_1d_is_optimal(x, k):
    codebook, assignment = c.kmeans_1d(x, k)
    error = ((x - codebook[assignment]) ** 2).sum()
    k = min(k, len(np.unique(x)))
    assert len(codebook) == k and np.all(np.diff(codebook) > 0)
    assert error <= brute_force_kmeans(x, k) + 1e-9 * (1 + (x * x).sum())


def test_kmeans_1d_is_fast_on_a_large_layer_and_beats_lloyd():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=266_200)  # LeNet-300-100's weights, heavy tailed
    start = time.perf_counter()
    codebook, assignment = c.kmeans_1d(x, 4)
    assert time.perf_counter() - start < 10
    error = ((x - codebook[assignment]) ** 2).sum()
    centers = np.quantile(x, [0.125, 0.375, 0.625, 0.875])  # Lloyd's iterations
    for _ in range(50):
        nearest = np.argmin(np.abs(x[:, None] - centers[None]), axis=1)
        centers = np.array([x[nearest == j].mean() for j in range(4)])
    nearest = np.argmin(np.abs(x[:, None] - centers[None]), axis=1)
    assert error <= ((x - centers[nearest]) ** 2).sum() * (1 + 1e-9)


def test_quantize_shares_one_codebook_over_arrays_and_counts_index_bits():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 20)), rng.normal(3, 1, size=(5,))
    found = c.Quantize(4).project([a, b])
    assert len(np.unique(np.concatenate([v.ravel() for v in found.values]))) == 4
    assert [v.shape for v in found.values] == [(30, 20), (5,)]
    assert found.bits == 605 * 2 + 4 * 32


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 8), elements=finite))
def test_ternarize_scaled_is_optimal(x):
    found = c.Ternarize().project([x]).values[0]
    error = ((x - found) ** 2).sum()
    best = np.inf  # every kept set is the j largest magnitudes, at their mean
    ranked = np.sort(np.abs(x))[::-1]
    for j in range(1, x.size + 1):
        scale = ranked[:j].mean()
        kept = np.abs(x) >= ranked[j - 1]
        best = min(best, ((np.abs(x) - np.where(kept, scale, 0.0)) ** 2).sum())
    assert error <= best + 1e-9 * (1 + (x * x).sum())
    assert len(np.unique(np.abs(found[found != 0]))) <= 1


def test_binarize_and_ternarize_take_their_values():
    x = np.array([-2.0, -0.2, 0.0, 0.4, 1.6])
    np.testing.assert_allclose(
        c.Binarize().project([x]).values[0], [-0.84, -0.84, 0.84, 0.84, 0.84]
    )
    assert c.Binarize(scaled=False).project([x]).values[0].tolist() == [-1, -1, 1, 1, 1]
    assert c.Ternarize(scaled=False).project([x]).values[0].tolist() == [-1, 0, 0, 0, 1]
    np.testing.assert_allclose(c.Ternarize().project([x]).values[0], [-1.8, 0, 0, 0, 1.8])
    assert c.Binarize().project([x]).bits == 5 + 32


def test_prune_constraint_and_penalty_forms():
    x = np.array([3.0, -0.5, 1.0, -2.0, 0.1])
    assert c.Prune(keep=0.4).project([x]).values[0].tolist() == [3, 0, 0, -2, 0]
    assert c.Prune(keep=0.4).project([x]).bits == 2 * 32 + 5
    # L0 penalty: keep w where w^2 > 2 alpha / mu = 1; L1: shrink by alpha / mu = 0.5
    assert c.Prune(penalty=1.0).project([x], mu=2.0).values[0].tolist() == [3, 0, 0, -2, 0]
    shrunk = c.Prune(norm="l1", penalty=1.0).project([x], mu=2.0).values[0]
    np.testing.assert_allclose(shrunk, [2.5, 0, 0.5, -1.5, 0])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 10), elements=finite), st.floats(0.1, 20))
def test_the_l1_ball_projection_is_the_nearest_point_of_the_ball(x, radius):
    projected = c.Prune(norm="l1", radius=radius).project([x]).values[0]
    assert np.abs(projected).sum() <= radius * (1 + 1e-9)
    rng = np.random.default_rng(0)
    for _ in range(20):  # no point of the ball is nearer
        other = rng.normal(size=x.shape)
        other *= rng.uniform(0, radius) / max(np.abs(other).sum(), 1e-12)
        assert ((x - projected) ** 2).sum() <= ((x - other) ** 2).sum() + 1e-9


def test_low_rank_is_the_truncated_svd_and_rank_selection_minimises_its_objective():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 3, 4, 6))  # a conv kernel, as a 36 x 6 matrix
    found = c.LowRank(2).project([w])
    matrix = w.reshape(-1, 6)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    np.testing.assert_allclose(found.values[0].reshape(-1, 6), (u[:, :2] * s[:2]) @ vt[:2])
    assert found.bits == 32 * 2 * (36 + 6)
    alpha, mu = 0.3, 1.0
    chosen = c.LowRank(alpha=alpha).project([w], mu).detail["ranks"][0]
    objective = [mu / 2 * (s[r:] ** 2).sum() + alpha * r * 42 for r in range(7)]
    assert chosen == int(np.argmin(objective)) and 0 < chosen < 6
    assert c.LowRank(alpha=alpha).project([w], mu=100.0).detail["ranks"][0] > chosen


def test_additive_alternation_never_increases_the_error_and_recovers_a_planted_sum():
    rng = np.random.default_rng(3)
    codes = rng.choice([-0.5, 0.5], size=(40, 30))
    spikes = np.zeros(1200)
    spikes[rng.choice(1200, 12, replace=False)] = rng.normal(0, 5, 12)
    w = codes + spikes.reshape(40, 30)
    errors = []
    for rounds in range(1, 6):
        combined = c.Additive([c.Quantize(2), c.Prune(keep=0.01)], iterations=rounds)
        errors.append(((w - combined.project([w]).values[0]) ** 2).sum())
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12  # the codebook and the spikes found exactly
    summed = c.Quantize(2) + c.Prune(keep=0.01) + c.LowRank(1)
    assert [type(p).__name__ for p in summed.parts] == ["Quantize", "Prune", "LowRank"]
    assert combined.project([w]).bits == 1200 + 2 * 32 + 12 * 32 + 1200


def test_bad_options_get_clear_errors():
    with pytest.raises(ValueError, match=r"Quantize\(k=1\)"):
        c.Quantize(1)
    with pytest.raises(ValueError, match=r"keep=1.5"):
        c.Prune(keep=1.5)
    with pytest.raises(ValueError, match="exactly one of"):
        c.Prune(keep=0.1, penalty=1.0)
    with pytest.raises(ValueError, match=r"radius=0.5\): give an L1 radius > 0, with l1"):
        c.Prune(radius=0.5)
    with pytest.raises(ValueError, match="give a rank, or alpha="):
        c.LowRank()
    with pytest.raises(ValueError, match=r"a 36 x 6 kernel has rank at most 6"):
        c.LowRank(7).project([np.ones((3, 3, 4, 6))])
