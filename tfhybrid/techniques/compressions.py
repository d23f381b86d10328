"""The compressions LC combines, each with its exact C step (Carreira-Perpiñán & Idelbayev).

A compression Δ(Θ) maps parameters Θ to weights; its C step finds the Θ closest to given
weights w, argmin_Θ ||w − Δ(Θ)||² (plus a penalty α·C(Θ) scaled by the LC penalty μ,
for the penalty forms), and returns Δ(Θ) with the bits Θ takes to store. One compression
may act on several arrays jointly (one codebook, one pruning budget for all of them);
low rank acts on each array (a layer's kernel as a matrix) on its own.

- `Quantize(k)`: adaptive quantization, an optimal codebook of k values. The C step is
  k-means in one dimension, solved exactly: on the sorted weights an optimal clustering is
  contiguous, found by dynamic programming over the split points (`kmeans_1d`).
- `Binarize(scaled)`, `Ternarize(scaled)`: values in {−a, a} or {−a, 0, a}, with a the
  optimal scale (or 1 unscaled).
- `Prune(keep=...)`: L0 constraint (the largest `keep` share of the weights);
  `Prune(norm="l1", radius=...)`: L1 constraint (Euclidean projection onto the L1 ball);
  `Prune(norm=..., penalty=α)`: L0 or L1 penalty (hard or soft threshold).
- `LowRank(rank)`: truncated SVD; `LowRank(alpha=α)`: rank selection, the rank that
  minimises μ/2·||W − W_r||² + α·C(r), C(r) = r·(rows + cols) weights.
- `a + b`: an additive combination, w ≈ Δ_a(Θ_a) + Δ_b(Θ_b); its C step alternates the
  exact C step of each part on the residual of the others (`Additive.iterations` rounds),
  which never increases ||w − Σ Δ||².

Storage (bits) follows the shared cost model: 32 bits a float; a quantized array one
⌈log₂ k⌉-bit index per weight and its codebook; a pruned array its non-zeros and a
one-bit-per-entry bitmap; a low-rank matrix its two factors.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np

FLOAT_BITS = 32


@dataclasses.dataclass
class Compressed:
    """The result of a C step.

    Attributes:
        values: Δ(Θ), one array per array given, of its shape.
        bits: bits that Θ takes to store.
        detail: what was chosen (codebook, scale, ranks, kept share), for reports.
        parts: for an additive combination, each part's values (as `values`).
    """

    values: list
    bits: int
    detail: dict = dataclasses.field(default_factory=dict)
    parts: list = dataclasses.field(default_factory=list)


class Compression(abc.ABC):
    """One part Δ(Θ) of an LC combination and its exact C step."""

    def get_config(self) -> dict:
        """The options, JSON-able (`deserialize` rebuilds the compression from them)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @abc.abstractmethod
    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        """The C step: Δ(Θ) nearest `weights` (jointly), with the penalty's weight `mu`."""

    def __add__(self, other: Compression) -> Additive:
        return Additive([*_parts(self), *_parts(other)])


def serialize(compression: Compression) -> dict:
    """A JSON-able description of `compression`."""
    config = compression.get_config()
    if isinstance(compression, Additive):
        config = {**config, "parts": [serialize(p) for p in compression.parts]}
    return {"class_name": type(compression).__name__, "config": config}


def deserialize(config: dict) -> Compression:
    """The compression `serialize` described."""
    kinds = {c.__name__: c for c in (Quantize, Binarize, Ternarize, Prune, LowRank, Additive)}
    options = dict(config["config"])
    if config["class_name"] == "Additive":
        options["parts"] = [deserialize(p) for p in options["parts"]]
    return kinds[config["class_name"]](**options)


def _parts(compression: Compression) -> list[Compression]:
    return list(compression.parts) if isinstance(compression, Additive) else [compression]


def _flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(w) for w in weights]).astype(np.float64)


def _unflat(flat: np.ndarray, weights: list[np.ndarray]) -> list[np.ndarray]:
    sizes = np.cumsum([w.size for w in weights])[:-1]
    return [part.reshape(w.shape) for part, w in zip(np.split(flat, sizes), weights)]


class Quantize(Compression):
    """Adaptive quantization: every weight one of k values, the codebook optimal.

    Args:
        k: codebook size, >= 2.

    Raises:
        ValueError: for k < 2.
    """

    def __init__(self, k: int):
        if int(k) != k or k < 2:
            raise ValueError(f"Quantize(k={k!r}): give a codebook of at least 2 values.")
        self.k = int(k)

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        flat = _flat(weights)
        codebook, assignment = kmeans_1d(flat, self.k)
        bits = flat.size * math.ceil(math.log2(self.k)) + FLOAT_BITS * len(codebook)
        values = _unflat(codebook[assignment], weights)
        return Compressed(values, bits, {"codebook": codebook})


def kmeans_1d(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of 1-D `values`: (codebook in increasing order, each value's index).

    On sorted values an optimal clustering is contiguous, so the minimum squared error of
    the first i values in j clusters obeys D[j, i] = min over m of D[j-1, m] + SSE(m, i),
    with SSE from prefix sums. The best split m is non-decreasing in i, so each row is
    found by divide and conquer, vectorised level by level: O(k·n·log n).

    Args:
        values: the values (any shape; flattened).
        k: the number of clusters (fewer if there are fewer distinct values).

    Returns:
        (codebook, assignment): the cluster means, and the index of each value's mean.
    """
    flat = np.ravel(values).astype(np.float64)
    # Equal values share a cluster in some optimal clustering, so the splits run over the
    # distinct values, weighted by their counts: a tie in the error (values too close for
    # the prefix sums to tell apart) can then never split equal values into two clusters.
    x, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    n = x.size
    k = max(1, min(k, n))
    weight = counts.astype(np.float64)
    first = np.concatenate([[0.0], np.cumsum(weight * x)])
    second = np.concatenate([[0.0], np.cumsum(weight * x * x)])
    size = np.concatenate([[0.0], np.cumsum(weight)])

    def sse(start: np.ndarray, end: np.ndarray) -> np.ndarray:  # of x[start:end], weighted
        count = np.maximum(size[end] - size[start], 1.0)
        total = first[end] - first[start]
        return np.maximum(second[end] - second[start] - total * total / count, 0.0)

    ends = np.arange(n + 1)
    cost = sse(np.zeros_like(ends), ends)  # one cluster: x[0:i]
    splits = []
    for clusters in range(2, k + 1):
        cost, split = _next_row(cost, sse, n, clusters)
        splits.append(split)
    bounds = [n]
    for split in reversed(splits):
        bounds.append(int(split[bounds[-1]]))
    bounds = [0, *reversed(bounds)]
    codebook = np.array(
        [np.average(x[a:b], weights=weight[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    )
    labels = np.repeat(np.arange(k), np.diff(bounds))
    return codebook, labels[np.ravel(inverse)].astype(np.int64)


def _next_row(previous: np.ndarray, sse, n: int, clusters: int) -> tuple:
    """D[j, i] and its best split m for i = 0..n, from D[j-1, .] (see `kmeans_1d`):
    each of the `clusters` clusters non-empty, so m runs over clusters-1 .. i-1."""
    cost = np.full(n + 1, np.inf)
    split = np.zeros(n + 1, np.int64)
    # Segments (i_lo, i_hi, m_lo, m_hi): the best m of each i in [i_lo, i_hi] is in
    # [m_lo, m_hi]; solved at the middle i, which bounds both halves.
    segments = tuple(np.array([v]) for v in (clusters, n, clusters - 1, n - 1))
    while segments[0].size:
        i_lo, i_hi, m_lo, m_hi = segments
        mid = (i_lo + i_hi) // 2
        top = np.minimum(m_hi, mid - 1)
        counts = top - m_lo + 1
        owner = np.repeat(np.arange(mid.size), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        candidates = m_lo[owner] + np.arange(owner.size) - starts
        totals = previous[candidates] + sse(candidates, mid[owner])
        best = np.full(mid.size, np.inf)
        np.minimum.at(best, owner, totals)
        is_best = totals == best[owner]
        chosen = np.full(mid.size, n)
        np.minimum.at(chosen, owner[is_best], candidates[is_best])  # the smallest best m
        cost[mid], split[mid] = best, chosen
        left = (i_lo, mid - 1, m_lo, chosen)
        right = (mid + 1, i_hi, chosen, m_hi)
        segments = tuple(np.concatenate(pair) for pair in zip(left, right))
        keep = segments[0] <= segments[1]
        segments = tuple(s[keep] for s in segments)
    return cost, split


class _Scaled(Compression):
    """A compression to a few fixed multiples of one scale, learned or fixed at 1.

    Args:
        scaled: learn the scale a (one float stored) or fix it at 1.
    """

    def __init__(self, scaled: bool = True):
        self.scaled = bool(scaled)


class Binarize(_Scaled):
    """Every weight −a or a: a = mean |w| (scaled) or 1 (unscaled); its sign kept."""

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        flat = _flat(weights)
        scale = float(np.abs(flat).mean()) if self.scaled else 1.0
        values = np.where(flat >= 0, scale, -scale)
        bits = flat.size + (FLOAT_BITS if self.scaled else 0)
        return Compressed(_unflat(values, weights), bits, {"scale": scale})


class Ternarize(_Scaled):
    """Every weight −a, 0 or a. Scaled: the a and the zeroed weights that minimise the
    error, i.e. the j largest |w| kept at their mean for the j that maximises
    (their sum)² / j; unscaled: a = 1, the weights with |w| > 1/2 kept."""

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        flat = _flat(weights)
        magnitude = np.abs(flat)
        if self.scaled:
            ranked = np.sort(magnitude)[::-1]
            sums = np.cumsum(ranked)
            kept = int(np.argmax(sums * sums / np.arange(1, flat.size + 1))) + 1
            scale, threshold = sums[kept - 1] / kept, ranked[kept - 1]
            keep = magnitude >= threshold
            if keep.sum() > kept:  # ties at the threshold: keep the first ones
                keep[np.flatnonzero(magnitude == threshold)[kept - keep.sum() :]] = False
        else:
            scale, keep = 1.0, magnitude > 0.5
        values = np.where(keep, np.sign(flat) * scale, 0.0)
        bits = flat.size * 2 + (FLOAT_BITS if self.scaled else 0)
        return Compressed(_unflat(values, weights), bits, {"scale": float(scale)})


class Prune(Compression):
    """Sparse weights: an L0 or L1 constraint, or an L0 or L1 penalty.

    Args:
        keep: (L0 constraint) share in (0, 1] of the weights kept, the largest.
        norm: "l0" or "l1".
        radius: (L1 constraint) the largest L1 norm of the weights.
        penalty: (penalty forms) α of α·||θ||₀ or α·||θ||₁; the C step with the LC
            penalty μ keeps w where w² > 2α/μ (L0) or shrinks w by α/μ (L1).

    Raises:
        ValueError: unless exactly one of keep, radius and penalty is given, for keep
            outside (0, 1], a radius or penalty <= 0, or an unknown norm.
    """

    def __init__(
        self,
        keep: float | None = None,
        *,
        norm: str = "l0",
        radius: float | None = None,
        penalty: float | None = None,
    ):
        options = {"keep": keep, "radius": radius, "penalty": penalty}
        given = [name for name, value in options.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                "Prune(): give exactly one of keep= (L0 constraint), radius= (L1 "
                f"constraint) and penalty= (L0 or L1 penalty); got {given or 'none'}."
            )
        if norm not in ("l0", "l1"):
            raise ValueError(f"Prune(norm={norm!r}): give 'l0' or 'l1'.")
        if keep is not None and not (0 < keep <= 1 and norm == "l0"):
            raise ValueError(f"Prune(keep={keep!r}): give the share kept in (0, 1], with l0.")
        if radius is not None and not (radius > 0 and norm == "l1"):
            raise ValueError(f"Prune(radius={radius!r}): give an L1 radius > 0, with l1.")
        if penalty is not None and not penalty > 0:
            raise ValueError(f"Prune(penalty={penalty!r}): give a penalty > 0.")
        self.keep, self.norm, self.radius, self.penalty = keep, norm, radius, penalty

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        flat = _flat(weights)
        if self.keep is not None:
            values = np.zeros_like(flat)
            largest = np.argsort(-np.abs(flat), kind="stable")[: math.floor(self.keep * flat.size)]
            values[largest] = flat[largest]
        elif self.radius is not None:
            values = l1_ball_projection(flat, self.radius)
        elif self.norm == "l0":
            values = np.where(flat * flat > 2 * self.penalty / mu, flat, 0.0)
        else:
            values = np.sign(flat) * np.maximum(np.abs(flat) - self.penalty / mu, 0.0)
        nonzero = int(np.count_nonzero(values))
        bits = FLOAT_BITS * nonzero + flat.size
        return Compressed(_unflat(values, weights), bits, {"kept": nonzero / flat.size})


def l1_ball_projection(values: np.ndarray, radius: float) -> np.ndarray:
    """The Euclidean projection of `values` onto {x : ||x||₁ <= radius}: soft thresholding
    at the θ that makes the norm `radius` (Duchi, Shalev-Shwartz, Singer, Chandra 2008)."""
    magnitude = np.abs(values)
    if magnitude.sum() <= radius:
        return values.copy()
    ranked = np.sort(magnitude)[::-1]
    sums = np.cumsum(ranked) - radius
    index = np.arange(1, ranked.size + 1)
    last = np.flatnonzero(ranked - sums / index > 0)[-1]
    theta = sums[last] / (last + 1)
    return np.sign(values) * np.maximum(magnitude - theta, 0.0)


class LowRank(Compression):
    """Each array (as a matrix: its last axis the columns) at a low rank, by truncated SVD.

    Args:
        rank: the rank of every array; or None with `alpha`:
        alpha: rank selection: per array the r that minimises
            μ/2·||W − W_r||² + alpha·r·(rows + cols).

    Raises:
        ValueError: unless exactly one of rank (>= 1) and alpha (> 0) is given.
    """

    def __init__(self, rank: int | None = None, *, alpha: float | None = None):
        if (rank is None) == (alpha is None):
            raise ValueError("LowRank(): give a rank, or alpha= for rank selection.")
        if rank is not None and (int(rank) != rank or rank < 1):
            raise ValueError(f"LowRank(rank={rank!r}): give a rank >= 1.")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"LowRank(alpha={alpha!r}): give alpha > 0.")
        self.rank, self.alpha = (None if rank is None else int(rank)), alpha

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        values, bits, ranks = [], 0, []
        for w in weights:
            matrix = np.reshape(w, (-1, w.shape[-1])).astype(np.float64)
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
            rank = self._rank(s, matrix.shape, mu)
            values.append(((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(w.shape))
            bits += FLOAT_BITS * rank * sum(matrix.shape)
            ranks.append(rank)
        return Compressed(values, bits, {"ranks": ranks})

    def _rank(self, singular: np.ndarray, shape: tuple, mu: float) -> int:
        """The rank kept of a matrix of `shape` with these singular values.

        Raises:
            ValueError: for a rank above the matrix's.
        """
        if self.rank is not None:
            if self.rank > len(singular):
                raise ValueError(
                    f"LowRank(rank={self.rank}): a {shape[0]} x {shape[1]} kernel has rank "
                    f"at most {len(singular)}."
                )
            return self.rank
        dropped = np.concatenate([np.cumsum((singular * singular)[::-1])[::-1], [0.0]])
        ranks = np.arange(len(singular) + 1)
        objective = mu / 2 * dropped + self.alpha * ranks * sum(shape)
        return int(np.argmin(objective))


class Additive(Compression):
    """w ≈ the sum of its parts' Δ(Θ); the C step alternates each part's exact C step
    on the residual of the others, `iterations` rounds from all parts at zero.

    Args:
        parts: the compressions summed (at least two).
        iterations: rounds of alternation.
    """

    def __init__(self, parts: list[Compression], iterations: int = 10):
        self.parts, self.iterations = list(parts), int(iterations)

    def project(self, weights: list[np.ndarray], mu: float = 1.0) -> Compressed:
        found = [Compressed([np.zeros(w.shape) for w in weights], 0)] * len(self.parts)
        for _ in range(self.iterations):
            for index, part in enumerate(self.parts):
                others = _summed(found[:index] + found[index + 1 :], weights)
                found[index] = part.project([w - o for w, o in zip(weights, others)], mu)
        details = {"parts": [f.detail for f in found]}
        bits = sum(f.bits for f in found)
        return Compressed(_summed(found, weights), bits, details, [f.values for f in found])


def _summed(found: list[Compressed], weights: list[np.ndarray]) -> list[np.ndarray]:
    """Per array of `weights`, the sum of the values in `found` (zeros if none)."""
    return [sum((f.values[i] for f in found), np.zeros(w.shape)) for i, w in enumerate(weights)]
