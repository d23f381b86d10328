"""LowRankSparse: a kernel kept as a low-rank pair plus a sparse correction, W = L + S.

After Hawkins, Yang, Li, Lai & Chandra (2021), "Low-rank+sparse tensor compression for
neural networks": nets already factorised by depthwise-separable convolutions gain
little from low rank alone, so the coarse structure goes to a low-rank part L and the
fine structure to a sparse part S, and both are compressed. Only the abstract is
public; the choices here:

- Layers: Dense (a transformer's MLP and any Dense projection) and Conv2D, any kernel
  size. Depthwise, separable and transposed kernels are left whole, named in `select`'s
  reasons.
- L of a matrix kernel (Dense, 1 x 1 conv) = U V, started at the kernel's truncated SVD
  with the singular values split evenly (U = U_r sqrt(s), V = sqrt(s) V_r:
  `surgery.split_evenly`, as `factorize` splits); of a k x k conv a Tucker-2 chain
  (1 x 1 to r1, k x k core to r2, 1 x 1 back) started at its truncated HOSVD; trained at
  fixed ranks. Or, with `split="alternating"`, L fitted to the kernel less its outliers
  (a robust-PCA-style alternation).
- S has the kernel's whole shape, starts at the residual W - L (so the compression
  model computes the original function at first) and is pruned by TF-MOT's own
  `prune_low_magnitude` wrapper over the search (its schedules and `block_size`); at the
  search's end each mask keeps exactly the share of the entries `strip` keeps.
- Cost: L's factors, S's non-zeros and its bitmap; MACs add both branches, S's dense, as
  LiteRT runs a sparse kernel dense unless XNNPack takes it (see `techniques.sparse`). So
  the method saves parameters and bits, not MACs.
- `strip`: the layer becomes `plan.Parallel` parts, L's chain and a sparse layer of the
  kernel's shape, summed by an `Add` named like the layer, then its activation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tfhybrid import graph, plan, surgery
from tfhybrid._keras import is_factorable, keras
from tfhybrid.techniques import base
from tfhybrid.techniques.sparse import (
    SCHEDULES,
    PrunedByTFMOT,
    SparseWrapper,
    largest_mask,
    sparsity_for_density,
    with_inner_weights,
)

L = keras.layers
#: How L starts (see `LowRankSparse`'s `split`).
SPLITS = ("svd", "alternating")


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankPlusSparse(L.Layer, tfmot.sparsity.keras.PrunableLayer):
    """A Dense or Conv2D layer computing with the kernel L + S.

    For a Dense layer or a 1 x 1 conv, L = U V (a pair of factors); for a k x k conv,
    L is a Tucker-2 chain: U (input channels to r1), a k x k core (r1 to r2) and V (r2
    to output channels). TF-MOT's pruning wrapper prunes S alone (`get_prunable_weights`).

    Args:
        plain: `{"class_name", "config"}` of the layer this one stands for.
        rank: L's rank: an int for a pair of factors, [r1, r2] for a Tucker-2 chain.
    """

    def __init__(self, plain, rank, **kwargs):
        super().__init__(**kwargs)
        self.plain = {"class_name": plain["class_name"], "config": dict(plain["config"])}
        self.rank = tuple(int(r) for r in rank) if isinstance(rank, (list, tuple)) else int(rank)
        config = self.plain["config"]
        self.units = int(config.get("units") or config.get("filters"))
        self.use_bias = bool(config.get("use_bias", True))
        self.activation = keras.activations.get(config.get("activation"))
        self.kernel_size = tuple(config.get("kernel_size", (1, 1)))
        self.strides = tuple(config.get("strides", (1, 1)))
        self.tucker = isinstance(self.rank, tuple)

    def build(self, input_shape):
        channels_in = int(input_shape[-1])
        if self.tucker:
            r1, r2 = self.rank
            self.u = self.add_weight("u", shape=(channels_in, r1))
            self.core = self.add_weight("core", shape=(*self.kernel_size, r1, r2))
            self.v = self.add_weight("v", shape=(r2, self.units))
            shape = (*self.kernel_size, channels_in, self.units)
        else:
            self.u = self.add_weight("u", shape=(channels_in, self.rank))
            self.v = self.add_weight("v", shape=(self.rank, self.units))
            shape = (channels_in, self.units)
        self.sparse = self.add_weight("sparse", shape=shape)
        self.bias = self.add_weight("bias", shape=(self.units,)) if self.use_bias else None
        super().build(input_shape)

    def call(self, inputs):
        last = [[inputs.shape.rank - 1], [0]]
        if self.tucker:
            projected = self._convolve(tf.tensordot(inputs, self.u, last), self.core)
            outputs = tf.tensordot(projected, self.v, last) + self._convolve(inputs, self.sparse)
        else:
            if inputs.shape.rank == 4 and self.strides != (1, 1):  # a strided 1 x 1 conv
                inputs = inputs[:, :: self.strides[0], :: self.strides[1], :]
            low = tf.tensordot(tf.tensordot(inputs, self.u, last), self.v, last)
            outputs = low + tf.tensordot(inputs, self.sparse, last)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def _convolve(self, inputs, kernel):
        """`inputs` convolved with `kernel` as the plain layer convolves."""
        config = self.plain["config"]
        return tf.nn.convolution(
            inputs,
            kernel,
            strides=self.strides,
            padding=config.get("padding", "valid").upper(),
            dilations=tuple(config.get("dilation_rate", (1, 1))),
        )

    def compute_output_shape(self, input_shape):
        plain = keras.layers.deserialize(self.plain)
        return plain.compute_output_shape(input_shape)

    def get_prunable_weights(self) -> list:
        return [self.sparse]

    def get_config(self) -> dict:
        rank = list(self.rank) if self.tucker else self.rank
        return {**super().get_config(), "plain": self.plain, "rank": rank}

    def initial_weights(
        self, kernel: np.ndarray, bias: np.ndarray | None, outliers: np.ndarray | None = None
    ) -> list:
        """Weights in `build` order, L + S being the kernel: L fitted to the kernel less
        `outliers` (in S's shape; None: nothing) by `low_part`, S the residual."""
        target = self.in_sparse_shape(kernel)
        factors, low = self.low_part(target if outliers is None else target - outliers)
        return [*factors, target - low, *([bias] if self.use_bias else [])]

    def in_sparse_shape(self, kernel: np.ndarray) -> np.ndarray:
        """The plain layer's `kernel` in S's shape (a matrix, or a k x k kernel as it is)."""
        return kernel if self.tucker else kernel.reshape(-1, kernel.shape[-1])

    def low_part(self, target: np.ndarray) -> tuple[list, np.ndarray]:
        """(L's factors in `build` order, L) fitted to `target` (a kernel in S's shape): for
        a pair, its truncated SVD split evenly; for a Tucker-2 chain, its truncated HOSVD
        (U, V the leading left singular vectors of `target` unfolded along its input and
        output axes, the core `target` projected on them)."""
        if not self.tucker:
            first, second = surgery.split_evenly(target, self.rank)
            return [first, second], first @ second
        u, v = (_leading_vectors(target, axis, r) for axis, r in zip((2, 3), self.rank))
        core = np.einsum("hwio,ir,os->hwrs", target, u, v)
        return [u, core, v.T], np.einsum("hwrs,ir,os->hwio", core, u, v)

    def folded(self, sparse: np.ndarray) -> plan.PlainLayer:
        """The plain layer this one stands for, with the kernel L + `sparse` (folded into
        one kernel of the layer's shape) and the bias."""
        u, v = self.u.numpy(), self.v.numpy()
        low = np.einsum("ir,hwrs,so->hwio", u, self.core.numpy(), v) if self.tucker else u @ v
        config = self.plain["config"]
        shape = (*self.kernel_size, -1, self.units) if "filters" in config else low.shape
        bias = [self.bias.numpy()] if self.use_bias else []
        kernel = (low + sparse).reshape(shape)
        return plan.PlainLayer(self.plain["class_name"], config, [kernel, *bias])

    def parts(self, sparse: np.ndarray) -> plan.Parallel:
        """The plain layers `strip` keeps: L's chain beside a layer of kernel `sparse`
        (the bias rides on L's last layer), summed by an `Add` of this layer's name, then
        the activation."""
        name, plain = self.name, self.plain
        bias = [self.bias.numpy()] if self.use_bias else []
        u, v = self.u.numpy(), self.v.numpy()
        if self.tucker:
            low = (
                plan.part_of(plain, f"{name}_lowrank_in", [u], self.rank[0], pointwise=True),
                plan.part_of(plain, f"{name}_lowrank_core", [self.core.numpy()], self.rank[1]),
                plan.part_of(plain, f"{name}_lowrank_out", [v, *bias], pointwise=True),
            )
        else:
            low = plan.factor_pair(plain, f"{name}_lowrank", u, v, bias)
        conv = plain["class_name"] == "Conv2D"
        kernel_shape = (*self.kernel_size, -1, self.units) if conv else sparse.shape
        sparse_layer = (plan.part_of(plain, f"{name}_sparse", [sparse.reshape(kernel_shape)]),)
        return plan.Parallel(name, (low, sparse_layer), plain["config"].get("activation"))


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankSparseWrapper(SparseWrapper):
    """TF-MOT's pruning wrapper (with the search's counters) around a `LowRankPlusSparse`,
    which has the original layer's name; its own class keeps it apart from `Sparse`'s."""


@base.register_technique
class LowRankSparse(PrunedByTFMOT):
    """Each taken kernel as a low-rank pair plus a sparse correction (W = L + S).

    Args:
        rank: components of L per layer: an int (below each layer's break-even rank,
            from which L holds as many weights as the kernel; r1 = r2 = rank capped at
            the channels for a Tucker-2 chain), or a share in (0, 1) of each kernel's
            weights that L holds; None: the one share that meets the budget's params or
            bits target at the given `sparsity`.
        sparsity: share of S's entries set to zero at the search's end; None: the one
            share that meets the budget's params or bits target.
        split: how L starts: "svd", the kernel's truncated SVD (HOSVD for a k x k
            conv); "alternating", a robust-PCA-style split (`robust_outliers`) in which
            L is fitted to the kernel less the entries S will keep.
        fold: layers whose L + S `strip` folds back into one kernel of the layer's
            shape (True: every layer), for runtimes that gain nothing from the split;
            they cost as the whole layer in the budget.
        schedule: TF-MOT's schedule of S's sparsity over the search ("polynomial" or
            "constant", as for `Sparse`).
        block_size: TF-MOT's `block_size` for S.
        frequency: steps between mask updates; None: a twentieth of the search.
        layers: only these layers (besides `hybrid_compress`'s own `layers`/`skip`).
        skip: never these layers.

    Raises:
        ValueError: for a rank below 1 or a share outside (0, 1), a sparsity outside
            [0, 1), neither a rank nor a sparsity, an unknown schedule or split.
    """

    name = "lowrank_sparse"
    wrapper_class = LowRankSparseWrapper

    def __init__(
        self,
        rank: int | float = 0.25,
        sparsity: float | None = None,
        schedule: str = "polynomial",
        block_size: tuple = (1, 1),
        frequency: int | None = None,
        layers: list | None = None,
        skip: list | tuple = (),
        split: str = "svd",
        fold: bool | list = False,
    ):
        share = isinstance(rank, float)
        if rank is not None and ((share and not 0 < rank < 1) or (not share and rank < 1)):
            raise ValueError(
                f"LowRankSparse(rank={rank!r}): give a number of components (>= 1) or a "
                "share of each kernel's weights in (0, 1)."
            )
        if rank is None and sparsity is None:
            raise ValueError(
                "LowRankSparse(rank=None, sparsity=None): give one of them; the budget "
                "derives the other."
            )
        if sparsity is not None and not 0 <= sparsity < 1:
            raise ValueError(
                f"LowRankSparse(sparsity={sparsity!r}): give the share of S's entries to "
                "zero, in [0, 1)."
            )
        if schedule not in SCHEDULES:
            raise ValueError(
                f"LowRankSparse(schedule={schedule!r}): give one of {sorted(SCHEDULES)}."
            )
        if split not in SPLITS:
            raise ValueError(f"LowRankSparse(split={split!r}): give one of {list(SPLITS)}.")
        self.rank = rank if share or rank is None else int(rank)
        self.sparsity = None if sparsity is None else float(sparsity)
        self.schedule = schedule
        self.block_size = tuple(int(b) for b in block_size)
        self.frequency = None if frequency is None else int(frequency)
        self.layers, self.skip = list(layers or []), list(skip)
        self.split = split
        self.fold = fold if isinstance(fold, bool) else list(fold)
        self._ranks: dict[str, Any] = {}  # layer name -> rank of L, set by `select`
        self._taken: dict[str, Any] = {}  # layer name -> layer, set by `select`

    def get_config(self) -> dict:
        return {
            "rank": self.rank,
            "sparsity": self.sparsity,
            "schedule": self.schedule,
            "block_size": list(self.block_size),
            "frequency": self.frequency,
            "layers": self.layers,
            "skip": self.skip,
            "split": self.split,
            "fold": self.fold,
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        only, skip = setup.restricted("LowRankSparse", self.layers, self.skip)
        why_not = []
        for layer in setup.analysis.model.layers:
            _refuse_tfmot_wrapper(layer)
            if not any("kernel" in w.name for w in layer.weights):
                continue  # no kernel to keep as L + S (pooling, normalization, ...)
            reason = self._why_not(layer, only, skip)
            if reason is None:
                self._taken[layer.name] = layer
                self._ranks[layer.name] = None if self.rank is None else self._rank_of(layer)
            else:
                why_not.append(f"{layer.name}: {reason}")
        if not self._ranks:
            raise ValueError(
                "LowRankSparse finds no layer to take. Per layer:\n  " + "\n  ".join(why_not)
            )
        unknown = sorted(set(self.fold) - set(self._ranks)) if isinstance(self.fold, list) else []
        if unknown:
            raise ValueError(
                f"LowRankSparse(fold={self.fold}): it does not take {unknown}; fold only "
                f"layers it takes: {sorted(self._ranks)}."
            )
        return dict.fromkeys(self._ranks, "weights")

    def _why_not(self, layer: Any, only: set, skip: set) -> str | None:
        """Why this LowRankSparse leaves `layer` alone, or None if it takes it."""
        if layer.name in skip or (only and layer.name not in only):
            return "left out by `layers=`/`skip=`"
        reason = _why_not(layer)
        if reason is None and self.block_size != (1, 1) and _is_tucker(layer):
            return f"TF-MOT prunes blocks ({self.block_size}) only in 2-D kernels; its S is k x k"
        return reason

    def _rank_of(self, layer: Any) -> int | tuple[int, int]:
        """The layer's rank of L (r1, r2 for a Tucker-2 chain), checked against its
        break-even rank.

        Raises:
            ValueError: for an int rank at or above it, naming the layer.
        """
        break_even = _break_even(layer)
        if isinstance(self.rank, float):
            return _rank_for_share(layer, self.rank)
        if self.rank >= break_even:
            shape = " x ".join(str(d) for d in _kernel_shape(layer))
            form = "a Tucker-2 chain" if _is_tucker(layer) else "two factors"
            raise ValueError(
                f"LowRankSparse(rank={self.rank}): layer '{layer.name}' ({shape} kernel) "
                f"holds fewer weights whole than as {form} from rank {break_even} on. Give a "
                f"rank below {break_even}, a share such as 0.25, or skip=['{layer.name}']."
            )
        return _rank_form(layer, self.rank)

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Derives the sparsity, or the rank (as a share of each kernel's weights), from
        the budget if none was given (saved as the option)."""
        split = {n: la for n, la in self._taken.items() if not self._folds(n)}
        if not split and None in (self.rank, self.sparsity):
            raise ValueError(
                "LowRankSparse(fold=...) folds every layer it takes back into one kernel, "
                "which costs what the layer did: no rank or sparsity meets the budget. Give "
                "LowRankSparse(rank=..., sparsity=...), or fold fewer layers."
            )
        if self.rank is None:
            self.rank = _share_for_budget(setup, split, self.sparsity)
            self._ranks = {n: _rank_for_share(la, self.rank) for n, la in self._taken.items()}
        if self.sparsity is None:
            self.sparsity = _sparsity_for_budget(setup, {n: self._ranks[n] for n in split})

    def _folds(self, name: str) -> bool:
        """Whether `strip` folds layer `name`'s L + S into one kernel."""
        return self.fold is True or (self.fold is not False and name in self.fold)

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        rank = self._ranks.get(op.layer.name)
        if rank is None:
            return None
        plain = {"class_name": type(op.layer).__name__, "config": op.layer.get_config()}
        inner = LowRankPlusSparse(plain, rank, name=op.layer.name)
        schedule = SCHEDULES[self.schedule](self.sparsity)  # end_step: set_search_steps
        wrapper = LowRankSparseWrapper(inner, pruning_schedule=schedule, block_size=self.block_size)
        kernel, *bias = op.layer.get_weights()
        outliers = None
        if self.split == "alternating":
            target = inner.in_sparse_shape(kernel)
            outliers = robust_outliers(inner, target, 1.0 - self.sparsity)
        weights = inner.initial_weights(kernel, (bias or [None])[0], outliers)
        return with_inner_weights(wrapper, weights)

    # -- training ----------------------------------------------------------------------
    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """Each layer's rank and S's density at the search's end (a folded layer costs
        as it did whole)."""
        density = 1.0 - self.sparsity
        wrappers = [w for w in self.layers_of(model) if not self._folds(w.layer.name)]
        return base.Decisions(
            lowrank_sparse={w.layer.name: (w.layer.rank, density) for w in wrappers}
        )

    def plan(self, model: Any) -> plan.Plan:
        """Each layer becomes its parts, L's chain and S times TF-MOT's mask, or the
        layer whole with their sum folded into its kernel."""
        replace = {}
        for wrapper in self.layers_of(model):
            weight, mask, _ = wrapper.pruning_vars[0]
            sparse = (weight * mask).numpy()
            inner = wrapper.layer
            folds = self._folds(inner.name)
            replace[wrapper.name] = inner.folded(sparse) if folds else inner.parts(sparse)
        return plan.Plan.of(self.name, replace=replace)


def robust_outliers(
    layer: LowRankPlusSparse, kernel: np.ndarray, density: float, steps: int = 10
) -> np.ndarray:
    """The sparse part of a robust-PCA-style split of `kernel` (in S's shape): `steps`
    alternations of L fitted to the kernel less the outliers (`low_part`) and the
    outliers the `density` share of the largest entries of what L leaves. L fitted to
    the kernel less them spends its rank on the structure S will not keep."""
    outliers = np.zeros_like(kernel)
    for _ in range(steps):
        residual = kernel - layer.low_part(kernel - outliers)[1]
        outliers = residual * largest_mask(residual, None, None, density)
    return outliers


def _leading_vectors(kernel: np.ndarray, axis: int, count: int) -> np.ndarray:
    """The `count` leading left singular vectors of `kernel` unfolded along `axis`
    (a matrix with one row per index of that axis), as columns."""
    unfolded = np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1)
    return np.linalg.svd(unfolded, full_matrices=False)[0][:, :count]


def _kernel_shape(layer: Any) -> tuple:
    """`layer`'s kernel shape: (rows, cols) for a Dense or 1 x 1 conv (a matrix), else
    (kh, kw, input channels, output channels)."""
    shape = tuple(int(d) for d in layer.kernel.shape)
    return shape if _is_tucker(layer) else (math.prod(shape[:-1]), shape[-1])


def _is_tucker(layer: Any) -> bool:
    """Whether L is a Tucker-2 chain for `layer` (a k x k conv), not a pair of factors."""
    return type(layer) is L.Conv2D and tuple(layer.kernel_size) != (1, 1)


def _rank_form(layer: Any, rank: int) -> int | tuple[int, int]:
    """`rank` as L takes it: for a Tucker-2 chain, (r1, r2) = `rank` capped at the
    input and output channels."""
    if not _is_tucker(layer):
        return rank
    *_, channels_in, channels_out = _kernel_shape(layer)
    return min(rank, channels_in), min(rank, channels_out)


def _low_weights(layer: Any, rank: int | tuple[int, int]) -> int:
    """The weights of L at `rank` (as `_rank_form` gives it), the bias aside."""
    shape = _kernel_shape(layer)
    if isinstance(rank, tuple):
        (r1, r2), area = rank, math.prod(shape[:-2])
        return shape[-2] * r1 + area * r1 * r2 + r2 * shape[-1]
    return rank * (shape[0] + shape[1])


def _break_even(layer: Any) -> int:
    """The smallest rank at which L holds at least the weights of `layer`'s kernel."""
    shape = _kernel_shape(layer)
    size = math.prod(shape)
    if not _is_tucker(layer):
        return math.ceil(size / (shape[0] + shape[1]))
    ranks = range(1, max(shape[-2:]) + 1)  # at the largest, L holds more than the kernel
    return next(r for r in ranks if _low_weights(layer, _rank_form(layer, r)) >= size)


def _rank_for_share(layer: Any, share: float) -> int | tuple[int, int]:
    """The rank at which L holds about `share` of the kernel's weights (at most, and
    fewer than the kernel): a pair's rank that share of its break-even rank; a Tucker-2
    chain's r1 and r2 the same share t of the input and output channels, t solving
    area*cin*cout*t^2 + (cin^2 + cout^2)*t = share*area*cin*cout."""
    if not _is_tucker(layer):
        return max(1, min(_break_even(layer) - 1, math.floor(share * _break_even(layer))))
    *area, cin, cout = _kernel_shape(layer)
    size = math.prod(area) * cin * cout
    quadratic, linear = size, cin * cin + cout * cout
    t = (math.sqrt(linear * linear + 4 * quadratic * share * size) - linear) / (2 * quadratic)
    r1, r2 = max(1, math.floor(t * cin)), max(1, math.floor(t * cout))
    while _low_weights(layer, (r1, r2)) >= size:  # rounding r1 or r2 up to 1 overshot
        lower_r1 = r2 == 1 or (r1 > 1 and r1 / cin > r2 / cout)
        r1, r2 = (r1 - 1, r2) if lower_r1 else (r1, r2 - 1)
    return r1, r2


def _why_not(layer: Any) -> str | None:
    """Why LowRankSparse cannot take `layer`, or None if it can."""
    if not is_factorable(layer):
        return (
            "it takes Dense layers and channels-last Conv2D layers without groups, "
            f"not {type(layer).__name__}"
        )
    if _break_even(layer) < 2:
        return "its kernel holds fewer weights whole than L at rank 1"
    return None


def _refuse_tfmot_wrapper(layer: Any) -> None:
    """Raises for a layer TF-MOT already wraps (pruning, clustering, quantization).

    Raises:
        ValueError: naming the layer and what to do.
    """
    if isinstance(layer, L.Wrapper) and type(layer).__module__.startswith(
        "tensorflow_model_optimization"
    ):
        raise ValueError(
            f"Layer '{layer.name}' is already wrapped by TF-MOT ({type(layer).__name__}). "
            "Compress the plain model: strip TF-MOT's wrappers first (strip_pruning, "
            "strip_clustering), or leave TF-MOT's pruning to th.Sparse."
        )


def _budget_meter(setup: base.Setup, derived: str):
    """A test of LowRankSparse decisions ({layer: (rank, density)}) against the budget's
    params and bits targets, for deriving the option `derived`.

    Raises:
        ValueError: without a params or bits target.
    """
    targets = {k: v for k, v in setup.budget.targets().items() if k in ("params", "bits")}
    if not targets:
        raise ValueError(
            f"LowRankSparse() without a {derived} needs a params or bits budget to derive it "
            f"from, and {setup.budget} has none (S's zeros do not reduce dense MACs). Give "
            f"LowRankSparse({derived}=...), or Budget(params=...)."
        )

    def meets(decided: dict) -> bool:
        costs = setup.cost_model.costs(lowrank_sparse=decided)
        return all(costs[k] <= share * setup.original[k] for k, share in targets.items())

    return meets


def _largest(meets, tolerance: float) -> float:
    """The largest x in [0, 1) with `meets(x)` (monotone: true up to some x), to
    `tolerance`, given `meets(0)`."""
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if meets(middle) else (low, middle)
    return low


def _sparsity_for_budget(setup: base.Setup, ranks: dict) -> float:
    """The one sparsity of every S that meets the budget's params and bits targets.

    Raises:
        ValueError: without a params or bits target, or when even empty S's miss it.
    """
    meter = _budget_meter(setup, "sparsity")

    def meets(density: float) -> bool:
        return meter({name: (rank, density) for name, rank in ranks.items()})

    if not meets(0.0):
        raise ValueError(
            f"{setup.budget} cannot be met by LowRankSparse at these ranks: with every S "
            "empty the low-rank pairs alone exceed it. Lower the rank, or stack a technique "
            "that removes channels."
        )
    return sparsity_for_density(_largest(meets, 1e-7))


def _share_for_budget(setup: base.Setup, layers: dict, sparsity: float) -> float:
    """The one share of each kernel's weights that L holds (`_rank_for_share`) that meets
    the budget's params and bits targets with S at `sparsity`.

    Raises:
        ValueError: without a params or bits target, or when even rank 1 misses it.
    """
    meter = _budget_meter(setup, "rank")

    def meets(share: float) -> bool:
        decided = {n: (_rank_for_share(la, share), 1.0 - sparsity) for n, la in layers.items()}
        return meter(decided)

    if not meets(0.0):
        raise ValueError(
            f"{setup.budget} cannot be met by LowRankSparse at sparsity {sparsity}: at rank 1 "
            "L and S exceed it. Raise the sparsity, or stack a technique that removes "
            "channels."
        )
    return max(1e-3, _largest(meets, 1e-3))
