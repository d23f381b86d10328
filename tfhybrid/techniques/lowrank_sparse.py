"""LowRankSparse: a kernel kept as a low-rank pair plus a sparse correction, W = L + S.

After Hawkins, Yang, Li, Lai & Chandra (2021), "Low-rank+sparse tensor compression for
neural networks": nets already factorised by depthwise-separable convolutions gain
little from low rank alone, so the coarse structure goes to a low-rank part L and the
fine structure to a sparse part S, and both are compressed. Only the abstract is
public; the choices here:

- Layers: Dense (a transformer's MLP and any Dense projection), Conv2D (any kernel size)
  and self-attention (`MultiHeadAttention` on (batch, tokens, channels), no mask): its
  query, key, value and output kernels, each as a matrix (`LowRankSparseAttention`).
  Depthwise, separable and transposed kernels are left whole, named in `select`'s
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
  kernel's shape, summed by an `Add` named like the layer, then its activation; an
  attention becomes `plan.Attention`, its four projections so around a dot-product core.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tfhybrid import channels, graph, plan, surgery
from tfhybrid._keras import is_factorable, keras
from tfhybrid.cost import PROJECTIONS, kernel_key, projection_matrix
from tfhybrid.techniques import base
from tfhybrid.techniques.sparse import (
    SCHEDULES,
    PrunedByTFMOT,
    SparseWrapper,
    largest_mask,
    query_first,
    sparsity_for_density,
    with_inner_weights,
)

L = keras.layers
#: How L starts (see `LowRankSparse`'s `split`).
SPLITS = ("svd", "alternating")
#: The shares of a layer's budget that `rank="auto"` tries giving L (0: S alone).
AUTO_SHARES = (0.0, 0.05, 0.1, 0.2, 1 / 3, 0.5)


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankPlusSparse(L.Layer, tfmot.sparsity.keras.PrunableLayer):
    """A Dense or Conv2D layer computing with the kernel L + S.

    For a Dense layer or a 1 x 1 conv, L = U V (a pair of factors); for a k x k conv,
    L is a Tucker-2 chain: U (input channels to r1), a k x k core (r1 to r2) and V (r2
    to output channels). At rank 0 there is no L: the layer computes with S alone.
    TF-MOT's pruning wrapper prunes S alone (`get_prunable_weights`).

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
        self.has_low = _has_low(self.rank)

    def build(self, input_shape):
        channels_in = int(input_shape[-1])
        if not self.has_low:
            shape = (*self.kernel_size, channels_in, self.units)
            shape = shape if self.tucker else (math.prod(shape[:-1]), self.units)
        elif self.tucker:
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
        if not self.has_low:
            if inputs.shape.rank == 4 and (self.tucker or self.strides != (1, 1)):
                outputs = self._convolve(inputs, tf.reshape(self.sparse, self._kernel_shape()))
            else:
                outputs = tf.tensordot(inputs, self.sparse, last)
        elif self.tucker:
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

    def _kernel_shape(self) -> tuple:
        """The plain layer's kernel shape (-1 for the input channels)."""
        return (
            (*self.kernel_size, -1, self.units)
            if "filters" in self.plain["config"]
            else (-1, self.units)
        )

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
        return fitted_low_part(target, self.rank)

    def folded(self, sparse: np.ndarray) -> plan.PlainLayer:
        """The plain layer this one stands for, with the kernel L + `sparse` (folded into
        one kernel of the layer's shape) and the bias."""
        if not self.has_low:
            low = 0.0
        elif self.tucker:
            low = np.einsum("ir,hwrs,so->hwio", self.u.numpy(), self.core.numpy(), self.v.numpy())
        else:
            low = self.u.numpy() @ self.v.numpy()
        bias = [self.bias.numpy()] if self.use_bias else []
        kernel = (low + sparse).reshape(self._kernel_shape())
        return plan.PlainLayer(self.plain["class_name"], self.plain["config"], [kernel, *bias])

    def parts(self, sparse: np.ndarray) -> plan.Parallel | plan.PlainLayer:
        """The plain layers `strip` keeps: L's chain beside a layer of kernel `sparse`
        (the bias rides on L's last layer), summed by an `Add` of this layer's name, then
        the activation; at rank 0, the plain layer with kernel `sparse`."""
        if not self.has_low:
            return self.folded(sparse)
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
        sparse_layer = (
            plan.part_of(plain, f"{name}_sparse", [sparse.reshape(self._kernel_shape())]),
        )
        return plan.Parallel(name, (low, sparse_layer), plain["config"].get("activation"))


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankSparseAttention(L.Layer, tfmot.sparsity.keras.PrunableLayer):
    """A self-attention layer whose query, key, value and output projections each
    compute with the kernel L + S (L = U V, a pair of factors; S of the projection's
    whole matrix shape), on (batch, tokens, channels) inputs, as `MultiHeadAttention`
    computes without a mask. TF-MOT's pruning wrapper prunes the four S's.

    Args:
        plain: `{"class_name", "config"}` of the `MultiHeadAttention` it stands for.
        rank: L's rank per projection, {"query": r, "key": r, "value": r, "output": r}.
        channels: the input's channels.
        units: the output's channels.
    """

    def __init__(self, plain, rank, channels, units, **kwargs):
        super().__init__(**kwargs)
        self.plain = {"class_name": plain["class_name"], "config": dict(plain["config"])}
        self.rank = {p: int(rank[p]) for p in PROJECTIONS}
        self.channels, self.units = int(channels), int(units)
        config = self.plain["config"]
        self.heads, self.key_dim = int(config["num_heads"]), int(config["key_dim"])
        self.value_dim = int(config["value_dim"] or self.key_dim)
        self.use_bias = bool(config["use_bias"])
        self.dropout = L.Dropout(float(config["dropout"]))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each projection's kernel as a matrix (rows, columns)."""
        heads = self.heads
        return {
            "query": (self.channels, heads * self.key_dim),
            "key": (self.channels, heads * self.key_dim),
            "value": (self.channels, heads * self.value_dim),
            "output": (heads * self.value_dim, self.units),
        }

    def build(self, input_shape):
        self.factors = {}
        for p, (rows, cols) in self.shapes().items():
            u = v = None
            if self.rank[p]:
                u = self.add_weight(f"{p}_u", shape=(rows, self.rank[p]))
                v = self.add_weight(f"{p}_v", shape=(self.rank[p], cols))
            sparse = self.add_weight(f"{p}_sparse", shape=(rows, cols))
            bias = self.add_weight(f"{p}_bias", shape=(cols,)) if self.use_bias else None
            self.factors[p] = (u, v, sparse, bias)
        super().build(input_shape)

    def call(self, query, value=None, key=None, training=None):
        value = query if value is None else value
        key = value if key is None else key
        q = self._heads(self._project("query", query), self.key_dim)
        q = q * tf.cast(1.0 / math.sqrt(self.key_dim), q.dtype)
        k = self._heads(self._project("key", key), self.key_dim)
        v = self._heads(self._project("value", value), self.value_dim)
        weights = tf.nn.softmax(tf.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        attended = tf.einsum("bhqk,bkhd->bqhd", self.dropout(weights, training=training), v)
        merged = tf.reshape(attended, [tf.shape(attended)[0], -1, self.heads * self.value_dim])
        return self._project("output", merged)

    def _project(self, part: str, inputs):
        u, v, sparse, bias = self.factors[part]
        last = [[2], [0]]
        outputs = tf.tensordot(inputs, sparse, last)
        if u is not None:
            outputs = outputs + tf.tensordot(tf.tensordot(inputs, u, last), v, last)
        return outputs if bias is None else outputs + bias

    def _heads(self, projected, size: int):
        return tf.reshape(projected, [tf.shape(projected)[0], -1, self.heads, size])

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([*input_shape[:-1], self.units])

    def get_prunable_weights(self) -> list:
        return [self.factors[p][2] for p in PROJECTIONS]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "plain": self.plain,
            "rank": self.rank,
            "channels": self.channels,
            "units": self.units,
        }

    def initial_weights(self, weights: list, outliers: dict | None = None) -> list:
        """Weights in `build` order from the attention layer's (`get_weights` order), L + S
        being each projection's kernel: L fitted to it less `outliers[part]` (None:
        nothing) by its truncated SVD, S the residual."""
        kernels = self.kernels(weights)
        built = []
        for p, (kernel, bias) in kernels.items():
            factors, low = self.low_part(p, kernel - (outliers or {}).get(p, 0.0))
            built += [*factors, kernel - low, *([bias] if self.use_bias else [])]
        return built

    def kernels(self, weights: list) -> dict:
        """part -> (kernel as a matrix, bias as a vector or None) of the attention layer's
        weights (in its `get_weights` order: each projection's kernel, then its bias)."""
        shapes, step = self.shapes(), 2 if self.use_bias else 1
        return {
            p: (
                np.reshape(weights[i * step], shapes[p]),
                np.reshape(weights[i * step + 1], -1) if self.use_bias else None,
            )
            for i, p in enumerate(PROJECTIONS)
        }

    def low_part(self, part: str, target: np.ndarray) -> tuple[list, np.ndarray]:
        """(L's factors, L) of projection `part` fitted to `target` (its truncated SVD,
        split evenly)."""
        return fitted_low_part(target, self.rank[part])

    def folded(self, sparses: list) -> plan.PlainLayer:
        """The `MultiHeadAttention` this layer stands for, each kernel L + its S
        (`sparses` in `PROJECTIONS` order)."""
        config, heads = self.plain["config"], self.heads
        kernel_shapes = {
            "query": (self.channels, heads, self.key_dim),
            "key": (self.channels, heads, self.key_dim),
            "value": (self.channels, heads, self.value_dim),
            "output": (heads, self.value_dim, self.units),
        }
        weights = []
        for p, sparse in zip(PROJECTIONS, sparses):
            u, v, _, bias = self.factors[p]
            low = 0.0 if u is None else u.numpy() @ v.numpy()
            weights.append((low + sparse).reshape(kernel_shapes[p]))
            if bias is not None:
                bias_shape = (self.units,) if p == "output" else kernel_shapes[p][1:]
                weights.append(bias.numpy().reshape(bias_shape))
        return plan.PlainLayer(self.plain["class_name"], config, weights)

    def parts(self, sparses: list) -> plan.Attention:
        """The plain layers `strip` keeps: each projection as a Dense pair of L's factors
        beside a Dense of kernel S (summed by an `Add` named `<layer>_<part>`; the output
        projection's takes the layer's name), around a dot-product attention core; a
        projection at rank 0 as one Dense of kernel S."""
        config = self.plain["config"]
        projections = {}
        for p, sparse in zip(PROJECTIONS, sparses):
            u, v, _, bias = self.factors[p]
            name = self.name if p == "output" else f"{self.name}_{p}"
            dense = {"class_name": "Dense", "config": _dense_config(config, name, sparse.shape[1])}
            biases = [] if bias is None else [bias.numpy()]
            if u is None:
                projections[p] = plan.PlainLayer("Dense", dense["config"], [sparse, *biases])
                continue
            low = plan.factor_pair(dense, f"{name}_lowrank", u.numpy(), v.numpy(), biases)
            sparse_layer = (plan.part_of(dense, f"{name}_sparse", [sparse]),)
            projections[p] = plan.Parallel(name, (low, sparse_layer))
        return plan.Attention(
            self.name,
            **projections,
            heads=self.heads,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            dropout=float(config["dropout"]),
        )


def _dense_config(attention: dict, name: str, units: int) -> dict:
    """A Dense layer's config for one projection of the attention layer whose config is
    `attention`: `units` outputs, its initializers, regularizers and constraints."""
    kinds = ("initializer", "regularizer", "constraint")
    keys = [f"{w}_{kind}" for w in ("kernel", "bias") for kind in kinds]
    given = {k: attention[k] for k in keys if attention.get(k) is not None}
    config = L.Dense(units, name=name, use_bias=attention["use_bias"]).get_config()
    return {**config, **given}


@keras.utils.register_keras_serializable(package="tfhybrid")
class LowRankSparseWrapper(SparseWrapper):
    """TF-MOT's pruning wrapper (with the search's counters) around a `LowRankPlusSparse`,
    which has the original layer's name; its own class keeps it apart from `Sparse`'s."""


@base.register_technique
class LowRankSparse(PrunedByTFMOT):
    """Each taken kernel as a low-rank pair plus a sparse correction (W = L + S).

    Args:
        rank: components of L per kernel (each of an attention's four projections has
            its own): an int (below its break-even rank, from which L holds as many
            weights as the kernel; r1 = r2 = rank capped at the channels for a Tucker-2
            chain), or a share in (0, 1) of each kernel's weights that L holds (at least
            rank 1); None: the one share that meets the budget's params or bits target at
            the given `sparsity`; "auto": each layer's ranks and sparsity chosen from its
            weights (`auto_split`) at the budget pruning alone would meet; or a dict by
            layer name (or `<attention>/<projection>`) of ints >= 0 (0: S alone) or
            [r1, r2] for a Tucker-2 chain, naming every layer taken.
        sparsity: share of S's entries set to zero at the search's end; None: the one
            share that meets the budget's params or bits target; or a dict by layer name,
            naming every layer taken.
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
        ValueError: for a rank below 1 (below 0 in a dict) or a share outside (0, 1), a
            sparsity outside [0, 1), neither a rank nor a sparsity, "auto" with a
            sparsity, an unknown schedule or split.
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
        _check_rank(rank)
        if rank is None and sparsity is None:
            raise ValueError(
                "LowRankSparse(rank=None, sparsity=None): give one of them; the budget "
                "derives the other."
            )
        if rank == "auto" and sparsity is not None:
            raise ValueError(
                f"LowRankSparse(rank='auto', sparsity={sparsity!r}): 'auto' chooses each "
                "layer's sparsity with its ranks; leave sparsity=None."
            )
        given = sparsity.values() if isinstance(sparsity, dict) else [sparsity]
        if any(s is not None and not 0 <= s < 1 for s in given):
            raise ValueError(
                f"LowRankSparse(sparsity={sparsity!r}): give the share of S's entries to "
                "zero, in [0, 1) (one, or one per layer name)."
            )
        if schedule not in SCHEDULES:
            raise ValueError(
                f"LowRankSparse(schedule={schedule!r}): give one of {sorted(SCHEDULES)}."
            )
        if split not in SPLITS:
            raise ValueError(f"LowRankSparse(split={split!r}): give one of {list(SPLITS)}.")
        self.rank = _rank_option(rank)
        self.sparsity = sparsity if sparsity is None else _floats(sparsity)
        self.schedule = schedule
        self.block_size = tuple(int(b) for b in block_size)
        self.frequency = None if frequency is None else int(frequency)
        self.layers, self.skip = list(layers or []), list(skip)
        self.split = split
        self.fold = fold if isinstance(fold, bool) else list(fold)
        self._ranks: dict[str, Any] = {}  # kernel key -> rank of L, set by `select`
        self._taken: dict[str, Any] = {}  # layer name -> layer, set by `select`
        self._kernels: dict[str, tuple] = {}  # kernel key -> its shape, set by `select`

    def get_config(self) -> dict:
        rank = self.rank
        if isinstance(rank, dict):
            rank = {k: list(r) if isinstance(r, tuple) else r for k, r in rank.items()}
        return {
            "rank": rank,
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
            reason = self._why_not(layer, setup, only, skip)
            if reason is None:
                self._taken[layer.name] = layer
                self._kernels.update(_kernel_shapes(layer))
            else:
                why_not.append(f"{layer.name}: {reason}")
        if not self._taken:
            raise ValueError(
                "LowRankSparse finds no layer to take. Per layer:\n  " + "\n  ".join(why_not)
            )
        if isinstance(self.rank, dict):
            self._ranks = self._given_ranks()
        elif self.rank not in (None, "auto"):
            ranks = self._kernels.items()
            self._ranks = {key: self._rank_of(key, shape, self.rank) for key, shape in ranks}
        if isinstance(self.sparsity, dict):
            _check_named(self.sparsity, set(self._taken), "sparsity", "layer")
        unknown = sorted(set(self.fold) - set(self._taken)) if isinstance(self.fold, list) else []
        if unknown:
            raise ValueError(
                f"LowRankSparse(fold={self.fold}): it does not take {unknown}; fold only "
                f"layers it takes: {sorted(self._taken)}."
            )
        return dict.fromkeys(self._taken, "weights")

    def _why_not(self, layer: Any, setup: base.Setup, only: set, skip: set) -> str | None:
        """Why this LowRankSparse leaves `layer` alone, or None if it takes it."""
        if layer.name in skip or (only and layer.name not in only):
            return "left out by `layers=`/`skip=`"
        if isinstance(layer, L.MultiHeadAttention):
            return _why_not_attention(layer, setup.analysis)
        reason = _why_not(layer)
        if reason is None and self.block_size != (1, 1) and len(_kernel_shape(layer)) == 4:
            return f"TF-MOT prunes blocks ({self.block_size}) only in 2-D kernels; its S is k x k"
        return reason

    def _given_ranks(self) -> dict:
        """The ranks given per kernel key (an attention's layer name standing for its four
        projections), checked.

        Raises:
            ValueError: naming the kernels missing or unknown, or a rank too large.
        """
        given = {}
        for name, rank in self.rank.items():
            keys = [k for k in self._kernels if _layer_of(k) == name and k != name]
            given.update(dict.fromkeys(keys or [name], rank))
        _check_named(given, set(self._kernels), "rank", "kernel")
        return {key: self._rank_of(key, self._kernels[key], r) for key, r in given.items()}

    def _rank_of(self, key: str, shape: tuple, rank: Any) -> int | tuple[int, int]:
        """The rank of L (r1, r2 for a Tucker-2 chain) of the kernel `key` of `shape` for
        the option `rank` (a share, an int or (r1, r2)), checked against its break-even.

        Raises:
            ValueError: for a rank at or above it, or (r1, r2) for a matrix, naming the
                layer.
        """
        if isinstance(rank, float):
            return _rank_for_share(shape, rank)
        break_even = _break_even(shape)
        if isinstance(rank, tuple):  # a Tucker-2 chain's (r1, r2): both 0 or both above
            chain = len(shape) == 4 and _has_low(rank) == (max(rank) > 0)
            too_large = not chain or _low_weights(shape, rank) >= math.prod(shape)
        else:
            too_large = rank >= break_even
        if too_large:
            layer, kernel = _layer_of(key), " x ".join(str(d) for d in shape) + " kernel"
            if key != layer:
                kernel = f"its {key.rpartition('/')[2]} projection, a {kernel}"
            form = "a Tucker-2 chain" if len(shape) == 4 else "two factors"
            raise ValueError(
                f"LowRankSparse(rank={rank}): layer '{layer}' ({kernel}) holds fewer "
                f"weights whole than as {form} from rank {break_even} on (r1, r2 only for a "
                f"k x k conv, both 0 or both above). Give a rank below {break_even}, a share "
                f"such as 0.25, or skip=['{layer}']."
            )
        return rank if isinstance(rank, tuple) else _rank_form(shape, rank)

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Derives the sparsity, or the rank (as a share of each kernel's weights), from
        the budget if none was given (saved as the option)."""
        split = {k: shape for k, shape in self._kernels.items() if not self._folds(_layer_of(k))}
        if not split and None in (self.rank, self.sparsity):
            raise ValueError(
                "LowRankSparse(fold=...) folds every layer it takes back into one kernel, "
                "which costs what the layer did: no rank or sparsity meets the budget. Give "
                "LowRankSparse(rank=..., sparsity=...), or fold fewer layers."
            )
        if self.rank == "auto":
            self.rank, self.sparsity = self._auto_split(setup, split)
            self._ranks = dict(self.rank)
        if self.rank is None:
            densities = {k: 1.0 - self.target_sparsity(_layer_of(k)) for k in split}
            self.rank = _share_for_budget(setup, split, densities)
            kernels = self._kernels.items()
            self._ranks = {k: _rank_for_share(shape, self.rank) for k, shape in kernels}
        if self.sparsity is None:
            self.sparsity = _sparsity_for_budget(setup, {k: self._ranks[k] for k in split})

    def _auto_split(self, setup: base.Setup, split: dict) -> tuple[dict, dict]:
        """({kernel key: rank}, {layer: sparsity}) for `rank="auto"`: each layer holds the
        share of its weights that S alone would at the budget (`split`: the kernels the
        budget counts as L + S), split between L and S by `auto_split`."""
        alone = {k: _rank_form(shape, 0) for k, shape in split.items()}
        density = 1.0 - _sparsity_for_budget(setup, alone)
        ranks, sparsities = {}, {}
        for name, layer in self._taken.items():
            layer_ranks, kept = auto_split(_kernel_values(layer), density)
            ranks.update(layer_ranks)
            sparsities[name] = sparsity_for_density(kept)
        return ranks, sparsities

    def target_sparsity(self, name: str) -> float:
        """The sparsity of layer `name`'s S at the search's end."""
        return self.sparsity[name] if isinstance(self.sparsity, dict) else self.sparsity

    def _folds(self, name: str) -> bool:
        """Whether `strip` folds layer `name`'s L + S into one kernel."""
        return self.fold is True or (self.fold is not False and name in self.fold)

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        layer = op.layer
        if layer.name not in self._taken:
            return None
        if isinstance(layer, L.MultiHeadAttention):
            return self._attention_in_training(op)
        rank = self._ranks[layer.name]
        plain = {"class_name": type(layer).__name__, "config": layer.get_config()}
        inner = LowRankPlusSparse(plain, rank, name=layer.name)
        kernel, *bias = layer.get_weights()
        outliers = None
        if self.split == "alternating":
            target = inner.in_sparse_shape(kernel)
            density = 1.0 - self.target_sparsity(layer.name)
            outliers = robust_outliers(inner.low_part, target, density)
        weights = inner.initial_weights(kernel, (bias or [None])[0], outliers)
        return with_inner_weights(self._wrapped(inner), weights)

    def _attention_in_training(self, op: graph.Op) -> graph.Replacement:
        """A `LowRankSparseAttention` for `op`'s attention layer, called with its query,
        value and key."""
        layer = op.layer
        shapes = _kernel_shapes(layer)
        width, units = (
            shapes[kernel_key(layer.name, "query")][0],
            shapes[kernel_key(layer.name, "output")][1],
        )
        plain = {"class_name": type(layer).__name__, "config": layer.get_config()}
        ranks = {p: self._ranks[kernel_key(layer.name, p)] for p in PROJECTIONS}
        inner = LowRankSparseAttention(plain, ranks, width, units, name=layer.name)
        weights = layer.get_weights()
        outliers = None
        if self.split == "alternating":
            density = 1.0 - self.target_sparsity(layer.name)
            outliers = {
                p: robust_outliers(partial(inner.low_part, p), kernel, density)
                for p, (kernel, _) in inner.kernels(weights).items()
            }
        call = with_inner_weights(self._wrapped(inner), inner.initial_weights(weights, outliers))
        return query_first(call, layer)

    def _wrapped(self, inner: Any) -> LowRankSparseWrapper:
        """`inner` in TF-MOT's pruning wrapper, with this technique's schedule."""
        target = self.target_sparsity(inner.name)
        schedule = SCHEDULES[self.schedule](target)  # end_step: set_search_steps
        return LowRankSparseWrapper(inner, pruning_schedule=schedule, block_size=self.block_size)

    def kernel_keys(self, wrapper: Any) -> list[str]:
        if isinstance(wrapper.layer, LowRankSparseAttention):
            return [kernel_key(wrapper.layer.name, p) for p in PROJECTIONS]
        return [wrapper.layer.name]

    # -- training ----------------------------------------------------------------------
    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """Each layer's rank and S's density at the search's end (a folded layer costs
        as it did whole)."""
        decided = {}
        for wrapper in self.layers_of(model):
            inner = wrapper.layer
            if self._folds(inner.name):
                continue
            density = 1.0 - self.target_sparsity(inner.name)
            if isinstance(inner, LowRankSparseAttention):
                decided.update(
                    {kernel_key(inner.name, p): (inner.rank[p], density) for p in PROJECTIONS}
                )
            else:
                decided[inner.name] = (inner.rank, density)
        return base.Decisions(lowrank_sparse=decided)

    def plan(self, model: Any) -> plan.Plan:
        """Each layer becomes its parts, L's chain and S times TF-MOT's mask, or the
        layer whole with their sum folded into its kernel."""
        replace = {}
        for wrapper in self.layers_of(model):
            sparse = [(weight * mask).numpy() for weight, mask, _ in wrapper.pruning_vars]
            if not isinstance(wrapper.layer, LowRankSparseAttention):
                (sparse,) = sparse
            inner = wrapper.layer
            folds = self._folds(inner.name)
            replace[wrapper.name] = inner.folded(sparse) if folds else inner.parts(sparse)
        return plan.Plan.of(self.name, replace=replace)


def robust_outliers(
    low_part: Callable, kernel: np.ndarray, density: float, steps: int = 10
) -> np.ndarray:
    """The sparse part of a robust-PCA-style split of `kernel` (in S's shape): `steps`
    alternations of L fitted to the kernel less the outliers (`low_part`, a layer's
    (factors, L) of a target) and the outliers the `density` share of the largest
    entries of what L leaves. L fitted to the kernel less them spends its rank on the
    structure S will not keep."""
    outliers = np.zeros_like(kernel)
    for _ in range(steps):
        residual = kernel - low_part(kernel - outliers)[1]
        outliers = residual * largest_mask(residual, None, None, density)
    return outliers


def fitted_low_part(target: np.ndarray, rank: int | tuple[int, int]) -> tuple[list, np.ndarray]:
    """(L's factors, L) at `rank` fitted to `target` (a kernel in S's shape): for a pair,
    its truncated SVD split evenly; for a Tucker-2 chain, its truncated HOSVD (U, V the
    leading left singular vectors of `target` unfolded along its input and output axes,
    the core `target` projected on them); at rank 0, no factors and L = 0."""
    if not _has_low(rank):
        return [], np.zeros_like(target)
    if not isinstance(rank, tuple):
        first, second = surgery.split_evenly(target, rank)
        return [first, second], first @ second
    u, v = (_leading_vectors(target, axis, r) for axis, r in zip((2, 3), rank))
    core = np.einsum("hwio,ir,os->hwrs", target, u, v)
    return [u, core, v.T], np.einsum("hwrs,ir,os->hwio", core, u, v)


def _has_low(rank: int | tuple[int, int]) -> bool:
    """Whether L at `rank` has factors (rank 0, or (0, 0): S alone)."""
    return min(rank) > 0 if isinstance(rank, tuple) else rank > 0


def _leading_vectors(kernel: np.ndarray, axis: int, count: int) -> np.ndarray:
    """The `count` leading left singular vectors of `kernel` unfolded along `axis`
    (a matrix with one row per index of that axis), as columns."""
    unfolded = np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1)
    return np.linalg.svd(unfolded, full_matrices=False)[0][:, :count]


def _kernel_shape(layer: Any) -> tuple:
    """`layer`'s kernel shape: (rows, cols) for a Dense or 1 x 1 conv (a matrix), else
    (kh, kw, input channels, output channels)."""
    shape = tuple(int(d) for d in layer.kernel.shape)
    tucker = type(layer) is L.Conv2D and tuple(layer.kernel_size) != (1, 1)
    return shape if tucker else (math.prod(shape[:-1]), shape[-1])


def _kernel_shapes(layer: Any) -> dict[str, tuple]:
    """Kernel key (`cost.LayerTerms.key`) -> shape of each kernel LowRankSparse keeps as
    L + S in `layer`: its kernel (`_kernel_shape`), or an attention layer's four
    projections as matrices (`<layer>/query`, ...)."""
    if not isinstance(layer, L.MultiHeadAttention):
        return {layer.name: _kernel_shape(layer)}
    kernels = [w for w in layer.weights if "kernel" in w.name]  # in PROJECTIONS' order
    return {
        kernel_key(layer.name, p): projection_matrix(tuple(int(d) for d in w.shape), p)
        for p, w in zip(PROJECTIONS, kernels)
    }


def _kernel_values(layer: Any) -> dict[str, np.ndarray]:
    """Kernel key -> each kernel of `layer` that LowRankSparse keeps as L + S, in S's
    shape (`_kernel_shapes`)."""
    kernels = [w.numpy() for w in layer.weights if "kernel" in w.name]
    return {
        key: k.reshape(shape) for (key, shape), k in zip(_kernel_shapes(layer).items(), kernels)
    }


def auto_split(kernels: dict[str, np.ndarray], density: float) -> tuple[dict, float]:
    """How one layer's kernels (key -> kernel in S's shape) hold `density` of their
    entries as L + S: L at ranks holding a share of that (one of `AUTO_SHARES`, the same
    for each kernel), S the rest as its density, at the share that leaves the least of
    the kernels out (the squared entries neither L, fitted by `fitted_low_part`, nor S,
    the largest entries of what L leaves, keeps). Weights alone decide: a kernel close
    to low rank gives L more, one without that structure leaves it all to S.

    Returns:
        ({kernel key: rank}, S's density).
    """
    entries = sum(k.size for k in kernels.values())
    best = None
    for share in AUTO_SHARES:
        ranks = {
            key: _rank_for_share(k.shape, share * density, least=0) for key, k in kernels.items()
        }
        low = sum(_low_weights(k.shape, ranks[key]) for key, k in kernels.items())
        kept = (density * entries - low) / entries
        if kept < 0:
            continue
        lost = sum(_left_out(k, ranks[key], kept) for key, k in kernels.items())
        if best is None or lost < best[0]:
            best = (lost, ranks, kept)
    return best[1], best[2]


def _left_out(kernel: np.ndarray, rank: int | tuple[int, int], density: float) -> float:
    """The sum of the squared entries of `kernel` that neither L at `rank` nor S, the
    largest `density` share of what L leaves, keeps."""
    residual = kernel - fitted_low_part(kernel, rank)[1]
    return float(np.sum((residual * (1.0 - largest_mask(residual, None, None, density))) ** 2))


def _layer_of(key: str) -> str:
    """The layer a kernel key belongs to."""
    layer, _, projection = key.rpartition("/")
    return layer if projection in PROJECTIONS else key


def _rank_form(shape: tuple, rank: int) -> int | tuple[int, int]:
    """`rank` as L takes it for a kernel of `shape`: for a Tucker-2 chain (a 4-D
    shape), (r1, r2) = `rank` capped at the input and output channels."""
    if len(shape) == 2:
        return rank
    *_, channels_in, channels_out = shape
    return min(rank, channels_in), min(rank, channels_out)


def _low_weights(shape: tuple, rank: int | tuple[int, int]) -> int:
    """The weights of L at `rank` (as `_rank_form` gives it), the bias aside."""
    if isinstance(rank, tuple):
        (r1, r2), area = rank, math.prod(shape[:-2])
        return shape[-2] * r1 + area * r1 * r2 + r2 * shape[-1]
    return rank * (shape[0] + shape[1])


def _break_even(shape: tuple) -> int:
    """The smallest rank at which L holds at least the weights of a kernel of `shape`."""
    size = math.prod(shape)
    if len(shape) == 2:
        return math.ceil(size / (shape[0] + shape[1]))
    ranks = range(1, max(shape[-2:]) + 1)  # at the largest, L holds more than the kernel
    return next(r for r in ranks if _low_weights(shape, _rank_form(shape, r)) >= size)


def _rank_for_share(shape: tuple, share: float, least: int = 1) -> int | tuple[int, int]:
    """The rank at which L holds about `share` of a kernel's weights (at most, and
    fewer than the kernel), `least` at least (1, or 0: S alone where rank 1 holds more):
    a pair's rank that share of its break-even rank; a Tucker-2 chain's r1 and r2 the
    same share t of the input and output channels, t solving
    area*cin*cout*t^2 + (cin^2 + cout^2)*t = share*area*cin*cout."""
    if len(shape) == 2:
        return max(least, min(_break_even(shape) - 1, math.floor(share * _break_even(shape))))
    *area, cin, cout = shape
    size = math.prod(area) * cin * cout
    quadratic, linear = size, cin * cin + cout * cout
    t = (math.sqrt(linear * linear + 4 * quadratic * share * size) - linear) / (2 * quadratic)
    r1, r2 = max(least, math.floor(t * cin)), max(least, math.floor(t * cout))
    if min(r1, r2) == 0:
        return 0, 0
    while _low_weights(shape, (r1, r2)) >= size:  # rounding r1 or r2 up to 1 overshot
        lower_r1 = r2 == 1 or (r1 > 1 and r1 / cin > r2 / cout)
        r1, r2 = (r1 - 1, r2) if lower_r1 else (r1, r2 - 1)
    return r1, r2


def _check_rank(rank: Any) -> None:
    """Raises for a `rank` option that is none of: None, "auto", a share in (0, 1), an
    int >= 1, or a dict by layer name (or kernel key) of ints >= 0 or [r1, r2].

    Raises:
        ValueError: naming the bad value and what to give.
    """
    if isinstance(rank, dict):
        fine = all(_is_rank(r) or (_is_pair(r) and all(map(_is_rank, r))) for r in rank.values())
    else:
        share = isinstance(rank, float) and 0 < rank < 1
        fine = rank is None or rank == "auto" or share or (_is_rank(rank) and rank >= 1)
    if not fine:
        raise ValueError(
            f"LowRankSparse(rank={rank!r}): give a number of components (>= 1), a share of "
            "each kernel's weights in (0, 1), 'auto', or a dict of ranks (>= 0, or "
            "[r1, r2] for a k x k conv) by layer name."
        )


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _floats(value: float | dict) -> float | dict:
    """`value` as a float, or a dict's values as floats."""
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    return float(value)


def _rank_option(rank: Any) -> Any:
    """The `rank` option as kept: ints as ints, a dict's [r1, r2] as a tuple."""
    if isinstance(rank, dict):
        return {
            k: tuple(int(r) for r in v) if isinstance(v, (list, tuple)) else int(v)
            for k, v in rank.items()
        }
    return int(rank) if isinstance(rank, int) else rank


def _check_named(given: dict, taken: set, option: str, what: str) -> None:
    """Raises unless the per-layer `option` dict `given` names each of `taken` once.

    Raises:
        ValueError: naming what is missing or unknown.
    """
    missing, unknown = sorted(taken - set(given)), sorted(set(given) - taken)
    if missing or unknown:
        raise ValueError(
            f"LowRankSparse({option}={{...}}) names the {what}s it takes, each once: missing "
            f"{missing}, unknown {unknown}. It takes {sorted(taken)}; leave a layer out "
            "with skip=[...]."
        )


def _why_not(layer: Any) -> str | None:
    """Why LowRankSparse cannot take `layer` (not an attention layer), or None if it can."""
    if not is_factorable(layer):
        return (
            "it takes Dense layers, channels-last Conv2D layers without groups and "
            f"self-attention, not {type(layer).__name__}"
        )
    if _break_even(_kernel_shape(layer)) < 2:
        return "its kernel holds fewer weights whole than L at rank 1"
    return None


def _why_not_attention(layer: Any, analysis: Any) -> str | None:
    """Why LowRankSparse cannot take the `MultiHeadAttention` `layer`, or None if it can:
    it takes self-attention over (batch, tokens, channels) without a mask, whose heads
    the channel analysis keeps as a group."""
    for op in graph.ops(analysis.model):
        if op.layer is not layer:
            continue
        arguments = channels.attention_arguments(op)
        query = arguments["query"]
        if any(arguments.get(n) is not None for n in ("attention_mask", "use_causal_mask")):
            return "it is called with an attention mask"
        if arguments.get("return_attention_scores"):
            return "it returns its attention scores"
        if query.shape.rank != 3 or layer.get_config()["attention_axes"] not in (None, (1,), [1]):
            return "its inputs are not (batch, tokens, channels) attended over the tokens"
    if analysis.heads_group(layer.name) is None:
        return "it is not self-attention with one output (value or key is another tensor)"
    if min(_break_even(shape) for shape in _kernel_shapes(layer).values()) < 2:
        return "a projection holds fewer weights whole than L at rank 1"
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


def _share_for_budget(setup: base.Setup, kernels: dict, densities: dict) -> float:
    """The one share of each kernel's weights that L holds (`_rank_for_share`) that meets
    the budget's params and bits targets with each S at its density (`kernels`: key ->
    shape; `densities`: key -> S's density).

    Raises:
        ValueError: without a params or bits target, or when even rank 1 misses it.
    """
    meter = _budget_meter(setup, "rank")

    def meets(share: float) -> bool:
        ranks = {k: _rank_for_share(shape, share) for k, shape in kernels.items()}
        return meter({k: (rank, densities[k]) for k, rank in ranks.items()})

    if not meets(0.0):
        sparsities = sorted({round(1.0 - d, 6) for d in densities.values()})
        sparsities = sparsities[0] if len(sparsities) == 1 else sparsities
        raise ValueError(
            f"{setup.budget} cannot be met by LowRankSparse at sparsity {sparsities}: at rank 1 "
            "L and S exceed it. Raise the sparsity, or stack a technique that removes "
            "channels."
        )
    return max(1e-3, _largest(meets, 1e-3))
