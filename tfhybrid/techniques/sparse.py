"""Sparse: TF-MOT's magnitude pruning (`prune_low_magnitude`) as a technique.

Each Dense/Conv layer TF-MOT can prune is wrapped in TF-MOT's own pruning wrapper;
its sparsity follows one of TF-MOT's schedules over the search (`PolynomialDecay` from 0
to the target, or `ConstantSparsity` at the target), the mask updated every `frequency`
steps. The compression scheduler drives
the wrappers' steps (no `UpdatePruningStep` to add), the kept weights count in the
budget as non-zeros, and `strip` gives the plain layer with the mask applied (what
TF-MOT's `strip_pruning` keeps). Dense MACs do not fall: a runtime multiplies the
zeros unless it has sparse kernels (XNNPack's for 1x1 convolutions, see
`latency_on_xnnpack`); the `.tflite` shrinks with `export_tflite(..., sparse=True)`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from tfhybrid import channels, cost, graph, plan
from tfhybrid._keras import (
    CONV,
    DEPTHWISE_CONV,
    SEPARABLE_CONV,
    TRANSPOSED_CONV,
    build_self_attention,
    keras,
)
from tfhybrid.techniques import base

_sparsity = tfmot.sparsity.keras
#: TF-MOT's schedules by name, from the target sparsity (end_step set by the search).
SCHEDULES = {
    "polynomial": lambda target: _sparsity.PolynomialDecay(0.0, target, 0, 1, frequency=1),
    "constant": lambda target: _sparsity.ConstantSparsity(target, 0, end_step=1, frequency=1),
}
#: The layers whose kernel Sparse prunes: the cost model counts their non-zeros.
PRUNED = (keras.layers.Dense, *CONV)
NOT_PRUNED = (*DEPTHWISE_CONV, *SEPARABLE_CONV, *TRANSPOSED_CONV)


@keras.utils.register_keras_serializable(package="tfhybrid")
class SparseWrapper(pruning_wrapper.PruneLowMagnitude):
    """TF-MOT's pruning wrapper with the search's `step` and `decided` counters.

    It is a `PruneLowMagnitude`, so TF-MOT's `strip_pruning` and its pruning
    callbacks know it; tfhybrid's scheduler drives it instead of `UpdatePruningStep`.
    """

    def build(self, input_shape):
        if isinstance(self.layer, keras.layers.MultiHeadAttention):
            build_self_attention(self.layer, input_shape)  # Sparse takes self-attention only
        super().build(input_shape)
        base.add_search_state(self)

    def add_weight(self, name=None, *args, **kwargs):
        """TF-MOT's `add_weight`, numbering the masks and thresholds of a layer with
        several pruned kernels (an attention's four): `mask`, `mask_1`, ... (names that
        repeat within a layer cannot be saved in HDF5)."""
        if name in ("mask", "threshold"):
            numbered = self.__dict__.setdefault("_numbered", {})
            count = numbered[name] = numbered.get(name, -1) + 1
            name = f"{name}_{count}" if count else name
        return super().add_weight(name, *args, **kwargs)


class PrunedByTFMOT(base.Technique):
    """What the techniques whose layers are TF-MOT pruning wrappers share: the wrappers'
    steps driven by the search (no `UpdatePruningStep`), their schedules stretched over
    it, their masks made exact at its end, and their sparsity logged.

    Subclasses set `wrapper_class` (exactly the class of their wrappers) and keep
    `sparsity`, `block_size` and `frequency` as attributes.
    """

    wrapper_class: type
    sparsity: float
    block_size: tuple
    frequency: int | None

    def initialize(self, model: Any, original: Any) -> None:
        for wrapper in self.layers_of(model):
            wrapper.pruning_step.assign(0)  # as UpdatePruningStep does before the first batch

    # -- training ----------------------------------------------------------------------
    def layers_of(self, model: Any) -> list:
        return [layer for layer in model.layers if type(layer) is self.wrapper_class]

    def set_search_steps(self, model: Any, steps: int) -> None:
        """The sparsity reaches its target at the search's last step."""
        frequency = self.frequency or max(1, steps // 20)
        for wrapper in self.layers_of(model):
            schedule = wrapper.pruning_schedule  # shared with TF-MOT's pruning object
            schedule.end_step, schedule.frequency = int(steps), frequency

    def finish(self, model: Any) -> None:
        """Sets each mask to keep exactly the target share of the kernel entries that
        `strip` keeps (the largest), and applies it to the weights.

        TF-MOT's last mask update may fall a few steps before the search's end (every
        `frequency` steps), and channels another technique removes take their zeros
        with them: the kept kernel's density would differ from the one the budget
        counted. With `block_size` other than (1, 1) TF-MOT's masks are kept as they are.
        """
        kept = base.kept_kernel_channels(model)
        for wrapper in self.layers_of(model):
            density = 1.0 - self.target_sparsity(wrapper.layer.name)
            if self.block_size == (1, 1):
                for key, (weight, mask, _) in zip(self.kernel_keys(wrapper), wrapper.pruning_vars):
                    rows, cols = kept[key]
                    kernel = _as_matrix(weight.numpy(), key)
                    chosen = largest_mask(kernel, rows, cols, density)
                    mask.assign(chosen.reshape(weight.shape))
            wrapper.pruning_obj.weight_mask_op()

    def target_sparsity(self, name: str) -> float:
        """The sparsity of layer `name`'s pruned kernels at the search's end."""
        return self.sparsity

    def kernel_keys(self, wrapper: Any) -> list[str]:
        """The cost model's keys (`cost.LayerTerms.key`) of the kernels `wrapper` prunes,
        in the order of its `pruning_vars`."""
        return [wrapper.layer.name]

    def scalars(self, model: Any) -> dict[str, float]:
        """The share of zeros in each pruned kernel now (`sparsity/<layer>`)."""
        figures = {}
        for wrapper in self.layers_of(model):
            masks = [mask.numpy().ravel() for _, mask, _ in wrapper.pruning_vars]
            figures[f"sparsity/{wrapper.layer.name}"] = float(1.0 - np.concatenate(masks).mean())
        return figures


@base.register_technique
class Sparse(PrunedByTFMOT):
    """Unstructured (or block) magnitude pruning of kernels by TF-MOT.

    Args:
        sparsity: share of each pruned kernel's weights set to zero at the search's end;
            None: the share that meets `Budget(params=...)` and `Budget(bits=...)` with the
            other layers whole.
        schedule: TF-MOT's schedule over the search: "polynomial" (`PolynomialDecay`, 0
            to `sparsity`, cubic) or "constant" (`ConstantSparsity`: `sparsity` from the
            first mask update).
        block_size: TF-MOT's `block_size` (rows, cols) for block-sparse Dense kernels.
        frequency: steps between mask updates; None: a twentieth of the search.
        latency_on_xnnpack: prune only the layers TF-MOT's `PruneForLatencyOnXNNPack`
            allows (1x1 convolutions XNNPack runs sparse), for a real speed-up.
        layers: only these layers (besides `hybrid_compress`'s own `layers`/`skip`).
        skip: never these layers.

    Raises:
        ValueError: for a sparsity outside [0, 1).
    """

    name = "sparse"
    wrapper_class = SparseWrapper

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str = "polynomial",
        block_size: tuple = (1, 1),
        frequency: int | None = None,
        latency_on_xnnpack: bool = False,
        layers: list | None = None,
        skip: list | tuple = (),
    ):
        if sparsity is not None and not 0 <= sparsity < 1:
            raise ValueError(
                f"Sparse(sparsity={sparsity!r}): give the share of weights to zero, in [0, 1)."
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"Sparse(schedule={schedule!r}): give one of {sorted(SCHEDULES)}.")
        self.sparsity = None if sparsity is None else float(sparsity)
        self.schedule = schedule
        self.block_size = tuple(int(b) for b in block_size)
        self.frequency = None if frequency is None else int(frequency)
        self.latency_on_xnnpack = bool(latency_on_xnnpack)
        self.layers, self.skip = list(layers or []), list(skip)

    def get_config(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "schedule": self.schedule,
            "block_size": list(self.block_size),
            "frequency": self.frequency,
            "latency_on_xnnpack": self.latency_on_xnnpack,
            "layers": self.layers,
            "skip": self.skip,
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        policy = _sparsity.PruneForLatencyOnXNNPack() if self.latency_on_xnnpack else None
        self._restriction = setup.restricted("Sparse", self.layers, self.skip)
        taken, why_not = [], []
        for layer in setup.analysis.model.layers:
            if not _has_kernel(layer):
                continue
            reason = self._why_not(layer, setup, policy)
            if reason is None:
                taken.append(layer.name)
            else:
                why_not.append(f"{layer.name}: {reason}")
        if not taken:
            raise ValueError(
                "Sparse finds no layer to prune. Per layer:\n  " + "\n  ".join(why_not)
            )
        self._taken = taken
        return dict.fromkeys(taken, "weights")

    def _why_not(self, layer: Any, setup: base.Setup, policy: Any) -> str | None:
        only, skip = self._restriction
        if layer.name in skip or (only and layer.name not in only):
            return "left out by `layers=`/`skip=`"
        if isinstance(layer, keras.layers.MultiHeadAttention):
            return self._why_not_attention(layer, setup)
        if not isinstance(layer, PRUNED) or isinstance(layer, NOT_PRUNED):
            return (
                "Sparse prunes Dense and Conv kernels and self-attention's projections, "
                f"not a {type(layer).__name__}'s"
            )
        if policy is not None and not policy.allow_pruning(layer):
            return "PruneForLatencyOnXNNPack runs it dense (not a 1x1 convolution)"
        return None

    def _why_not_attention(self, layer: Any, setup: base.Setup) -> str | None:
        """Why Sparse leaves the attention layer `layer` alone, or None if it prunes its
        query, key, value and output kernels."""
        if self.latency_on_xnnpack:
            return "PruneForLatencyOnXNNPack runs it dense (not a 1x1 convolution)"
        if self.block_size != (1, 1):
            return f"TF-MOT prunes blocks ({self.block_size}) only in 2-D kernels"
        if setup.analysis.heads_group(layer.name) is None:
            return "its kernels are costed per projection for self-attention only"
        return None

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Derives the sparsity from the budget if none was given (saved as the option)."""
        if self.sparsity is None:
            self.sparsity = _sparsity_for_budget(setup, self._taken)

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if op.layer.name not in self._taken:
            return None
        schedule = SCHEDULES[self.schedule](self.sparsity)  # end_step: set_search_steps
        inner = graph.clone_layer(op.layer)
        wrapper = SparseWrapper(inner, pruning_schedule=schedule, block_size=self.block_size)
        call = with_inner_weights(wrapper, op.layer.get_weights())
        if isinstance(inner, keras.layers.MultiHeadAttention):
            return query_first(call, op.layer)
        return call

    def kernel_keys(self, wrapper: Any) -> list[str]:
        if isinstance(wrapper.layer, keras.layers.MultiHeadAttention):
            return [cost.kernel_key(wrapper.layer.name, p) for p in cost.PROJECTIONS]
        return [wrapper.layer.name]

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """The density every pruned kernel has at the search's end."""
        densities = {w.layer.name: 1.0 - self.sparsity for w in self.layers_of(model)}
        return base.Decisions(densities=densities)

    def plan(self, model: Any) -> plan.Plan:
        """Each wrapper becomes its layer, its kernel times TF-MOT's mask."""
        replace = {w.name: _masked_layer(w) for w in self.layers_of(model)}
        return plan.Plan.of(self.name, replace=replace)


def largest_mask(kernel: np.ndarray, rows, cols, density: float) -> np.ndarray:
    """A 0/1 mask of the floor(density * n) largest of the n entries in `rows` (the
    input axis, -2) and `cols` (the output axis, -1) of `kernel` (None: all)."""
    kept_rows, kept_cols = np.zeros(kernel.shape[-2], bool), np.zeros(kernel.shape[-1], bool)
    kept_rows[slice(None) if rows is None else rows] = True
    kept_cols[slice(None) if cols is None else cols] = True
    region = np.broadcast_to(kept_rows[:, None] & kept_cols[None, :], kernel.shape)
    values = np.abs(kernel[region])
    count = math.floor(density * values.size)
    mask = np.zeros(kernel.shape, np.float32)
    if count:
        chosen = np.argsort(-values, kind="stable")[:count]
        flat = np.flatnonzero(region)
        mask.flat[flat[chosen]] = 1.0
    return mask


def _has_kernel(layer: Any) -> bool:
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return True
    return getattr(layer, "kernel", None) is not None and layer.kernel.shape.rank >= 2


def _as_matrix(kernel: np.ndarray, key: str) -> np.ndarray:
    """An attention projection's kernel (`key` names it, see `cost.kernel_key`) as a
    matrix (`cost.projection_matrix`); any other kernel as it is."""
    if kernel.ndim != 3:
        return kernel
    return kernel.reshape(cost.projection_matrix(kernel.shape, key.rpartition("/")[2]))


def query_first(call: graph.Replacement, attention: Any) -> graph.Replacement:
    """A replacement for a call of the attention layer `attention` that calls `call` (a
    TF-MOT wrapper, or a replacement calling one) with the query first and every other
    argument by name: a wrapper's `call(inputs, training=None, **kwargs)` would take a
    value passed second as `training`."""

    def attend(*args: Any, **kwargs: Any) -> Any:
        arguments = channels.call_arguments(attention, args, kwargs)
        return call(arguments.pop("query"), **arguments)

    return attend


def with_inner_weights(wrapper: Any, weights: list) -> graph.Replacement:
    """A replacement calling `wrapper`, its wrapped layer set to `weights` once built."""
    state = {"set": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        outputs = wrapper(*args, **kwargs)
        if not state["set"]:
            wrapper.layer.set_weights(weights)
            state["set"] = True
        return outputs

    return call


def _masked_layer(wrapper: Any) -> plan.PlainLayer:
    """The wrapped layer as a plain layer, its pruned weights zero."""
    masks = {id(weight): mask for weight, mask, _ in wrapper.pruning_vars}
    weights = [
        w.numpy() * masks[id(w)].numpy() if id(w) in masks else w.numpy()
        for w in wrapper.layer.weights
    ]
    return plan.PlainLayer.of(wrapper.layer, weights)


def _sparsity_for_budget(setup: base.Setup, taken: list[str]) -> float:
    """The one sparsity of the `taken` kernels that meets the budget's params and bits
    targets alone (both fall linearly with the kept share).

    Raises:
        ValueError: without a params or bits target, or when even all-zero kernels miss it.
    """
    targets = {k: v for k, v in setup.budget.targets().items() if k in ("params", "bits")}
    if not targets:
        raise ValueError(
            f"Sparse() without a sparsity needs a params or bits budget to derive it from, "
            f"and {setup.budget} has none: zeros do not reduce dense MACs. Give "
            "Sparse(sparsity=0.8), or Budget(params=...)."
        )
    empty = setup.cost_model.costs(densities=dict.fromkeys(taken, 0.0))
    full = setup.cost_model.costs(densities=dict.fromkeys(taken, 1.0))
    kept = []
    for name, share in targets.items():
        allowed = share * setup.original[name]
        if empty[name] > allowed:
            raise ValueError(
                f"{setup.budget} cannot be met by Sparse alone: with every pruned kernel "
                f"empty the model keeps {empty[name] / setup.original[name]:.4f} of its "
                f"{name}. Raise the budget or stack a technique that removes channels."
            )
        gain = full[name] - empty[name]
        kept.append((allowed - empty[name]) / gain if gain > 0 else 1.0)
    return sparsity_for_density(min(kept))


def sparsity_for_density(density: float) -> float:
    """The sparsity that keeps at most `density` of the entries (to 1e-6), below 1 as
    TF-MOT's schedules need: a budget's derived sparsity is never rounded below it."""
    kept = math.floor(min(1.0, max(0.0, density)) * 1e6) / 1e6
    return float(min(1.0 - 1e-6, 1.0 - kept))
