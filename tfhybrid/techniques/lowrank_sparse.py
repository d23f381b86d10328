"""LowRankSparse: a kernel kept as a low-rank pair plus a sparse correction, W = L + S.

After Hawkins, Yang, Li, Lai & Chandra (2021), "Low-rank+sparse tensor compression for
neural networks": nets already factorised by depthwise-separable convolutions gain
little from low rank alone, so the coarse structure goes to a low-rank part L and the
fine structure to a sparse part S, and both are compressed. Only the abstract is
public; the choices here:

- Layers: Dense (a transformer's MLP and any Dense projection) and 1 x 1 Conv2D (the
  pointwise half of a separable block), whose kernels are matrices. k x k convolutions
  (Tucker-2) and depthwise kernels are left whole, named in `select`'s reasons.
- L = U V, started at the kernel's truncated SVD with the singular values split evenly
  (U = U_r sqrt(s), V = sqrt(s) V_r: `surgery.split_evenly`, as `factorize` splits),
  trained as two factors at a fixed rank.
- S has the kernel's whole shape, starts at the residual W - L (so the compression
  model computes the original function at first) and is pruned by TF-MOT's own
  `prune_low_magnitude` wrapper over the search (its schedules and `block_size`); at the
  search's end each mask keeps exactly the share of the entries `strip` keeps.
- Cost: L's factors, S's non-zeros and its bitmap; MACs add both branches, S's dense, as
  LiteRT runs a sparse kernel dense unless XNNPack takes it (see `techniques.sparse`). So
  the method saves parameters and bits, not MACs.
- `strip`: the layer becomes `plan.Parallel` parts, a 1 x 1 (or Dense) pair and a sparse
  layer of the kernel's shape, summed by an `Add` named like the layer, then its
  activation.
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
    with_inner_weights,
)

L = keras.layers


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankPlusSparse(L.Layer, tfmot.sparsity.keras.PrunableLayer):
    """A Dense or 1 x 1 Conv2D layer computing with the kernel U V + S.

    TF-MOT's pruning wrapper prunes S alone (`get_prunable_weights`).

    Args:
        plain: `{"class_name", "config"}` of the layer this one stands for.
        rank: columns of U (rows of V).
    """

    def __init__(self, plain, rank, **kwargs):
        super().__init__(**kwargs)
        self.plain = {"class_name": plain["class_name"], "config": dict(plain["config"])}
        self.rank = int(rank)
        config = self.plain["config"]
        self.units = int(config.get("units") or config.get("filters"))
        self.use_bias = bool(config.get("use_bias", True))
        self.activation = keras.activations.get(config.get("activation"))
        self.strides = tuple(config.get("strides", (1, 1)))

    def build(self, input_shape):
        channels_in = int(input_shape[-1])
        self.u = self.add_weight("u", shape=(channels_in, self.rank))
        self.v = self.add_weight("v", shape=(self.rank, self.units))
        self.sparse = self.add_weight("sparse", shape=(channels_in, self.units))
        self.bias = self.add_weight("bias", shape=(self.units,)) if self.use_bias else None
        super().build(input_shape)

    def call(self, inputs):
        if inputs.shape.rank == 4 and self.strides != (1, 1):  # a strided 1 x 1 conv
            inputs = inputs[:, :: self.strides[0], :: self.strides[1], :]
        last = [[inputs.shape.rank - 1], [0]]
        low = tf.tensordot(tf.tensordot(inputs, self.u, last), self.v, last)
        outputs = low + tf.tensordot(inputs, self.sparse, last)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        plain = keras.layers.deserialize(self.plain)
        return plain.compute_output_shape(input_shape)

    def get_prunable_weights(self) -> list:
        return [self.sparse]

    def get_config(self) -> dict:
        return {**super().get_config(), "plain": self.plain, "rank": self.rank}

    def initial_weights(self, kernel: np.ndarray, bias: np.ndarray | None) -> list:
        """Weights in `build` order: the kernel's truncated SVD split evenly, and the
        residual, so that U V + S is the kernel."""
        matrix = kernel.reshape(-1, kernel.shape[-1])
        first, second = surgery.split_evenly(matrix, self.rank)
        return [first, second, matrix - first @ second] + ([bias] if self.use_bias else [])

    def parts(self, sparse: np.ndarray) -> plan.Parallel:
        """The plain layers `strip` keeps: the pair U, V beside a layer of kernel `sparse`
        (the bias rides on V's layer), summed by an `Add` of this layer's name, then the
        activation."""
        name = self.name
        config = self.plain["config"]
        conv = self.plain["class_name"] == "Conv2D"
        width = "filters" if conv else "units"

        def layer(suffix, units, weights, **changes):
            layer_config = {**config, "name": f"{name}_{suffix}", width: units, **changes}
            layer_config.update(activation="linear", use_bias=len(weights) > 1)
            if conv:
                weights = [weights[0].reshape(1, 1, *weights[0].shape), *weights[1:]]
            return plan.PlainLayer(self.plain["class_name"], layer_config, weights)

        bias = [self.bias.numpy()] if self.use_bias else []
        pointwise = {"strides": (1, 1), "padding": "valid"} if conv else {}
        low = (
            layer("lowrank_in", self.rank, [self.u.numpy()]),
            layer("lowrank_out", self.units, [self.v.numpy(), *bias], **pointwise),
        )
        sparse_layer = (layer("sparse", self.units, [sparse]),)
        return plan.Parallel(name, (low, sparse_layer), config.get("activation"))


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankSparseWrapper(SparseWrapper):
    """TF-MOT's pruning wrapper (with the search's counters) around a `LowRankPlusSparse`,
    which has the original layer's name; its own class keeps it apart from `Sparse`'s."""


@base.register_technique
class LowRankSparse(PrunedByTFMOT):
    """Each taken kernel as a low-rank pair plus a sparse correction (W = L + S).

    Args:
        rank: components of L per layer: an int (below each layer's break-even rank,
            where two factors hold fewer weights than the kernel), or a share in (0, 1)
            of each layer's break-even rank.
        sparsity: share of S's entries set to zero at the search's end; None: the one
            share that meets the budget's params or bits target.
        schedule: TF-MOT's schedule of S's sparsity over the search ("polynomial" or
            "constant", as for `Sparse`).
        block_size: TF-MOT's `block_size` for S.
        frequency: steps between mask updates; None: a twentieth of the search.
        layers: only these layers (besides `hybrid_compress`'s own `layers`/`skip`).
        skip: never these layers.

    Raises:
        ValueError: for a rank below 1 or a share outside (0, 1), a sparsity outside
            [0, 1), an unknown schedule.
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
    ):
        share = isinstance(rank, float)
        if (share and not 0 < rank < 1) or (not share and rank < 1):
            raise ValueError(
                f"LowRankSparse(rank={rank!r}): give a number of components (>= 1) or a "
                "share of each layer's break-even rank in (0, 1)."
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
        self.rank = rank if share else int(rank)
        self.sparsity = None if sparsity is None else float(sparsity)
        self.schedule = schedule
        self.block_size = tuple(int(b) for b in block_size)
        self.frequency = None if frequency is None else int(frequency)
        self.layers, self.skip = list(layers or []), list(skip)
        self._ranks: dict[str, int] = {}  # layer name -> rank of L, set by `select`

    def get_config(self) -> dict:
        return {
            "rank": self.rank,
            "sparsity": self.sparsity,
            "schedule": self.schedule,
            "block_size": list(self.block_size),
            "frequency": self.frequency,
            "layers": self.layers,
            "skip": self.skip,
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        only, skip = setup.restricted("LowRankSparse", self.layers, self.skip)
        why_not = []
        for layer in setup.analysis.model.layers:
            _refuse_tfmot_wrapper(layer)
            if getattr(layer, "kernel", None) is None:
                continue
            reason = _why_not(layer)
            if reason is None and _break_even(layer) < 2:
                reason = "its kernel holds fewer weights whole than any pair of factors"
            if layer.name in skip or (only and layer.name not in only):
                reason = "left out by `layers=`/`skip=`"
            if reason is None:
                self._ranks[layer.name] = self._rank_of(layer)
            else:
                why_not.append(f"{layer.name}: {reason}")
        if not self._ranks:
            raise ValueError(
                "LowRankSparse finds no layer to take. Per layer:\n  " + "\n  ".join(why_not)
            )
        return dict.fromkeys(self._ranks, "weights")

    def _rank_of(self, layer: Any) -> int:
        """The layer's rank of L, checked against its break-even rank.

        Raises:
            ValueError: for an int rank at or above it, naming the layer.
        """
        rows, cols = int(np.prod(layer.kernel.shape[:-1])), int(layer.kernel.shape[-1])
        break_even = _break_even(layer)
        if isinstance(self.rank, float):
            return max(1, min(break_even - 1, math.floor(self.rank * break_even)))
        if self.rank >= break_even:
            raise ValueError(
                f"LowRankSparse(rank={self.rank}): layer '{layer.name}' ({rows} x {cols} "
                f"kernel) holds fewer weights whole than as two factors from rank "
                f"{break_even} on. Give a rank below {break_even}, a share such as 0.25, or "
                f"skip=['{layer.name}']."
            )
        return self.rank

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Derives the sparsity from the budget if none was given (saved as the option)."""
        if self.sparsity is None:
            self.sparsity = _sparsity_for_budget(setup, self._ranks)

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        rank = self._ranks.get(op.layer.name)
        if rank is None:
            return None
        plain = {"class_name": type(op.layer).__name__, "config": op.layer.get_config()}
        inner = LowRankPlusSparse(plain, rank, name=op.layer.name)
        schedule = SCHEDULES[self.schedule](self.sparsity)  # end_step: set_search_steps
        wrapper = LowRankSparseWrapper(inner, pruning_schedule=schedule, block_size=self.block_size)
        kernel, *bias = op.layer.get_weights()
        return with_inner_weights(wrapper, inner.initial_weights(kernel, (bias or [None])[0]))

    # -- training ----------------------------------------------------------------------
    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """Each layer's rank and S's density at the search's end."""
        return base.Decisions(
            lowrank_sparse={
                w.layer.name: (w.layer.rank, 1.0 - self.sparsity) for w in self.layers_of(model)
            }
        )

    def plan(self, model: Any) -> plan.Plan:
        """Each layer becomes its parts: the low-rank pair and S times TF-MOT's mask."""
        replace = {}
        for wrapper in self.layers_of(model):
            weight, mask, _ = wrapper.pruning_vars[0]
            parts = wrapper.layer.parts((weight * mask).numpy())
            replace[wrapper.name] = parts
        return plan.Plan.of(self.name, replace=replace)


def _break_even(layer: Any) -> int:
    """The rank from which two factors hold at least the weights of `layer`'s kernel."""
    rows, cols = int(np.prod(layer.kernel.shape[:-1])), int(layer.kernel.shape[-1])
    return math.ceil(rows * cols / (rows + cols))


def _why_not(layer: Any) -> str | None:
    """Why LowRankSparse cannot take `layer`, or None if it can."""
    if not is_factorable(layer):
        return (
            "it takes Dense layers and channels-last 1 x 1 Conv2D layers without groups, "
            f"not {type(layer).__name__}"
        )
    if type(layer) is L.Conv2D and tuple(layer.kernel_size) != (1, 1):
        return f"its {layer.kernel_size} kernel is not 1 x 1 (Tucker-2 is not built yet)"
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


def _sparsity_for_budget(setup: base.Setup, ranks: dict) -> float:
    """The one sparsity of every S that meets the budget's params and bits targets.

    Raises:
        ValueError: without a params or bits target, or when even empty S's miss it.
    """
    targets = {k: v for k, v in setup.budget.targets().items() if k in ("params", "bits")}
    if not targets:
        raise ValueError(
            f"LowRankSparse() without a sparsity needs a params or bits budget to derive it "
            f"from, and {setup.budget} has none (S's zeros do not reduce dense MACs). Give "
            "LowRankSparse(sparsity=0.9), or Budget(params=...)."
        )

    def meets(density: float) -> bool:
        paired = {name: (rank, density) for name, rank in ranks.items()}
        costs = setup.cost_model.costs(lowrank_sparse=paired)
        return all(costs[k] <= share * setup.original[k] for k, share in targets.items())

    if not meets(0.0):
        raise ValueError(
            f"{setup.budget} cannot be met by LowRankSparse at these ranks: with every S "
            "empty the low-rank pairs alone exceed it. Lower the rank, or stack a technique "
            "that removes channels."
        )
    low, high = 0.0, 1.0  # meets(low); the largest density that meets, to 1e-4
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if meets(middle) else (low, middle)
    return float(min(0.99, 1.0 - math.floor(low * 1e4) / 1e4))
