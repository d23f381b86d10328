"""DF: filters (DML-S) and ranks (DTL-S) learned together under one budget.

After Eo, Kang & Rhee (2023), "A Differentiable Framework for End-to-End Learning
of Hybrid Structured Compression".

- DML-S: one vector of mask logits per channel group, started in the order of the
  channels' L1 norms (see INITIAL_SPREAD); the soft mask
  sigmoid(logit / T) multiplies every tensor of the group once (DESIGN.md's
  exactness rule; pooling, padding, flatten and dropout commute with it, so a
  tensor only they consume is masked after them, where it is smaller), with T
  annealed so masks become 0/1.
- DTL-S: a Dense/Conv2D layer is trained as W = U diag(s * g) V, started from the
  SVD of its kernel, where g = sigmoid((s - tau) / T) gates each component against a
  learnable threshold tau; the soft rank is sum(g). U's columns and V's rows are
  kept at unit norm, so each component's size lives in s alone and thresholding s
  is meaningful. The gate, not the soft threshold relu(s - tau), scales the kept
  components (see `_Factored`).
- Budget: the soft channel counts and ranks feed `cost.CostModel`, the same
  arithmetic as `profile`; the penalty relu(ratio / target - 1) is added to the
  loss with a ramped weight.
- At the end of the search the decisions are made hard and, if they are over
  budget, projected: the least important channels/ranks go until the budget holds.

`DF` is the technique (see `techniques.base`): it builds the training-time layers
and states its decisions as a plan, which `surgery.strip` turns into a plain model.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import budget as budget_lib
from tfhybrid import cost, graph, schedules, surgery
from tfhybrid import plan as plan_lib
from tfhybrid._keras import SCALE_COMMUTING, HeadWeightedAttention, is_factorable, keras
from tfhybrid.techniques import base, magnitude

L = keras.layers

#: Mask logits and thresholds are stored divided by this, so that optimizer steps of
#: the usual size (1e-3) move them quickly enough for a search of a few 1000 steps.
LOGIT_SCALE = 10.0
#: Mean initial mask logit: sigmoid(4) = 0.982, so the starting model stays close to
#: the pretrained one although every tensor of a group is masked. A channel's logit
#: moves about 0.01 per Adam step, so this is also how far (in steps / 100) a channel
#: is from removal: larger starts leave the budget to the rank thresholds, smaller
#: ones let the first penalty steps empty whole layers (LeNet-5's conv1). Chosen by
#: trial searches of LeNet-5 at 10% and 5% of its MACs.
INITIAL_LOGIT = 4.0
#: A group's channels start from INITIAL_LOGIT - INITIAL_SPREAD (smallest L1 norm) to
#: INITIAL_LOGIT + INITIAL_SPREAD (largest), evenly by rank. Adam moves every logit at
#: about the same rate under the budget penalty, so channels started alike fall in
#: lock-step and cross zero together: the hard count drops past the budget before the
#: penalty stops (LeNet-5 at 5% kept 1 or 2 conv1 filters). Staggered, they cross one
#: at a time and the task gradient can hold the ones it needs.
INITIAL_SPREAD = 2.0
#: The rank thresholds start below zero, at -(INITIAL_LOGIT - INITIAL_SPREAD) / LOGIT_SCALE
#: of the layer's largest singular value: every component's gate then starts at
#: sigmoid(2) or more, as far from removal as the weakest channel. Started at 0, the
#: weakest components begin half gated and the thresholds remove them before any
#: channel comes near removal, so the search splits every layer first.
INITIAL_THRESHOLD = -(INITIAL_LOGIT - INITIAL_SPREAD) / LOGIT_SCALE
#: The shortest search in which the strongest channel can reach removal at the usual
#: rate: (INITIAL_LOGIT + INITIAL_SPREAD) / 0.01 per Adam(1e-3) step. A shorter search
#: moves the logits and thresholds faster by PACED_STEPS / search_steps (their `pace`):
#: at the usual rate, a 200-step search (ResNet-20, two epochs of 100 batches) could
#: not move a logit to zero, left the whole cut to the projection, and the projection,
#: among channels scored alike, removed the costliest group (the first stage's residual
#: stream, to 1 channel: 22% error at half the MACs, filters only, mean of 3 seeds).
PACED_STEPS = 600


@keras.utils.register_keras_serializable(package="tfhybrid")
@keras.utils.register_keras_serializable(package="tfhybrid")
class ChannelGates(base.SharedWithinAStep, L.Layer):
    """The masks of the channel groups under search, shared by all their tensors.

    Called once per masked tensor with that tensor's `layout`: a list of
    `[gate index or -1, group size, mult]` segments along its channel axis.

    Args:
        group_ids: ids (in `channel_groups` of the original model) of the gated groups.
        group_keys: each gated group's `ChannelGroup.key()` (stable across rebuilds).
        sizes: channels per gated group.
        temperature: schedule config of T (see `schedules`).
        pace: the logits are stored divided by it, so optimizer steps move them `pace`
            times as far (`DF.set_search_steps` sets it for short searches).
    """

    def __init__(self, group_ids, group_keys, sizes, temperature, pace=1.0, **kwargs):
        super().__init__(**kwargs)
        self.group_ids = [int(g) for g in group_ids]
        self.group_keys = [list(k) for k in group_keys]
        self.sizes = [int(s) for s in sizes]
        self.temperature = schedules.deserialize(temperature)
        self.pace = float(pace)

    def build(self, input_shape):
        init = keras.initializers.Constant(INITIAL_LOGIT / LOGIT_SCALE)
        self.logits = [
            self.add_weight(f"logits_{i}", shape=(n,), initializer=init)
            for i, n in enumerate(self.sizes)
        ]
        self.keep = [
            self.add_weight(f"keep_{i}", shape=(n,), initializer="ones", trainable=False)
            for i, n in enumerate(self.sizes)
        ]
        base.add_search_state(self)
        super().build(input_shape)

    def mask(self, index: int, hard: bool = False) -> tf.Tensor:
        """The mask of gated group `index`: soft during the search, the kept 0/1 once
        the decisions are taken (`DF.finish`).

        With `hard=True` the search's current hard decision (logit > 0) is given.
        """
        return self._memo(("mask", index, hard), lambda: self._mask(index, hard))

    def _mask(self, index: int, hard: bool) -> tf.Tensor:
        logits = self.logits[index]
        if hard:
            current = tf.cast(logits > 0, tf.float32)
        else:
            temperature = self._memo("temperature", lambda: self.temperature(self.step))
            current = tf.sigmoid(self.pace * LOGIT_SCALE * logits / temperature)
        return tf.where(self.decided > 0, self.keep[index], current)

    def masks(self, hard: bool = False) -> list[tf.Tensor]:
        """The masks of all gated groups (see `mask`)."""
        return [self.mask(i, hard) for i in range(len(self.sizes))]

    def scores(self, index: int) -> np.ndarray:
        """Eagerly, gated group `index`'s channels' scores for the projection onto the
        budget (see `_Projection`): positive for a channel the search keeps."""
        return self.pace * LOGIT_SCALE * self.logits[index].numpy()

    def set_pace(self, pace: float) -> None:
        """Eagerly: optimizer steps move the logits `pace` times as far; the masks stay."""
        for logits in self.logits:
            logits.assign(logits * (self.pace / pace))
        self.pace = float(pace)

    def _mask_vector(self, layout) -> tf.Tensor:
        """The mask of a tensor with `layout` (see the class).

        A layout that extends one already masked in this step appends to that mask: a
        DenseNet concatenation carries the block so far plus one layer's channels, and
        rebuilt from every group's mask, DenseNet121's 58 concatenations joined ~1,800
        pieces per step (and split as many again for the gradient).
        """
        before = self._memoized(_layout_key(layout[:-1]))
        if before is None:
            return self.laid_out(layout, self.mask)
        return tf.concat([before, self.laid_out(layout[-1:], self.mask)], 0)

    def laid_out(self, layout, vector_of) -> tf.Tensor:
        """One value per channel of a tensor with `layout` (see the class): each gated
        group's `vector_of(index)` (repeated `mult` times), ones for ungated segments."""
        parts = []
        for index, size, mult in layout:
            if index < 0:
                parts.append(tf.ones((size * mult,)))
            else:
                vector = vector_of(index)
                parts.append(vector if mult == 1 else tf.repeat(vector, mult))
        return tf.concat(parts, 0)

    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, layout=(), mask_only=False, training=None):  # noqa: ARG002
        """`inputs` times the mask of its `layout`; with `mask_only`, that mask alone
        (one value per channel), for a layer that weighs its channels by it."""
        key = _layout_key(layout)
        vector = tf.cast(self._memo(key, lambda: self._mask_vector(layout)), inputs.dtype)
        return vector if mask_only else inputs * vector

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "group_ids": self.group_ids,
            "group_keys": self.group_keys,
            "sizes": self.sizes,
            "temperature": schedules.serialize(self.temperature),
            "pace": self.pace,
        }

    def compression_note(self) -> str:
        kept = sum(int(np.sum(m)) for m in self.masks(hard=True))
        return f"gates {len(self.sizes)} groups, kept {kept}/{sum(self.sizes)} channels"


def _layout_key(layout) -> tuple:
    """The key of a tensor layout's mask among a step's shared decisions."""
    return ("layout", tuple(tuple(segment) for segment in layout))


class _Factored(base.SharedWithinAStep, L.Layer):
    """Base of the factored layers: W = U diag(s * g) V, g = sigmoid((s - tau) / T) (DTL-S).

    Like a channel mask, the gate g tends to 0/1 as T anneals, so the components
    kept are left at their size. Soft thresholding (s - tau for the kept ones) was
    the first design: it shrank every kept component by the tau that sets the rank,
    and the fine-tuned models were less accurate (docs/benchmarks.md).

    Args:
        plain: `{"class_name", "config"}` of the layer this one stands for.
        rank: number of components searched (at most the kernel's rank).
        temperature: schedule config of the soft rank's temperature.
        s_max: the kernel's largest initial singular value; the threshold is
            `tau * s_max * pace` and the soft rank's temperature is scaled by `s_max / 10`.
        pace: how many times as far optimizer steps move the threshold (as for
            `ChannelGates`).
    """

    plain_class: type

    def __init__(self, plain, rank, temperature, s_max=1.0, pace=1.0, **kwargs):
        super().__init__(**kwargs)
        self.pace = float(pace)
        self.plain = {"class_name": plain["class_name"], "config": dict(plain["config"])}
        self.rank = int(rank)
        self.temperature = schedules.deserialize(temperature)
        self.s_max = float(s_max)
        config = self.plain["config"]
        self.units = int(config.get("units") or config.get("filters"))
        self.use_bias = bool(config.get("use_bias", True))
        self.activation = keras.activations.get(config.get("activation"))

    def build(self, input_shape):
        rows = self._rows(input_shape)
        self.u = self.add_weight("u", shape=(rows, self.rank))
        self.s = self.add_weight("s", shape=(self.rank,), initializer="ones")
        self.v = self.add_weight("v", shape=(self.rank, self.units))
        self.bias = self.add_weight("bias", shape=(self.units,)) if self.use_bias else None
        self.tau = self.add_weight("tau", shape=(), initializer="zeros")
        self.active = self.add_weight(
            "active", shape=(self.rank,), initializer="ones", trainable=False
        )
        base.add_search_state(self)
        super().build(input_shape)

    def threshold(self) -> tf.Tensor:
        return self.tau * self.s_max * self.pace

    def set_pace(self, pace: float) -> None:
        """Eagerly: optimizer steps move the threshold `pace` times as far; it stays."""
        self.tau.assign(self.tau * (self.pace / pace))
        self.pace = float(pace)

    def component_logits(self) -> tf.Tensor:
        """Per component, (s - threshold) in the mask logits' units: the gate is
        sigmoid(this / T), and the projection ranks components by it."""
        return self._memo("logits", lambda: (self.s - self.threshold()) * LOGIT_SCALE / self.s_max)

    def component_gates(self, hard: bool = False) -> tf.Tensor:
        """Per component: sigmoid(logit / T) during the search, the kept 0/1 once the
        decisions are taken.
        With `hard=True` the search's current hard decision (s > threshold)."""
        return self._memo(("gates", hard), lambda: self._component_gates(hard))

    def _component_gates(self, hard: bool) -> tf.Tensor:
        logits = self.component_logits()
        if hard:
            current = tf.cast(logits > 0, tf.float32)
        else:
            current = tf.sigmoid(logits / self.temperature(self.step))
        return tf.where(self.decided > 0, self.active, current)

    def soft_rank(self, hard: bool = False) -> tf.Tensor:
        """Smooth count of the components above the threshold (or the hard count)."""
        return tf.reduce_sum(self.component_gates(hard))

    def _norm_scale(self) -> tf.Tensor:
        """1 / (|U column| * |V row|) per component: U diag(s * this) V equals the
        product of the normalised factors, without forming them every step."""
        squares = _sum_of_squares(self.u, 0) * _sum_of_squares(self.v, 1)
        return tf.math.rsqrt(tf.maximum(squares, 1e-24))

    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None):  # noqa: ARG002 - Keras passes training
        s = tf.cast(self.s * self.component_gates() * self._norm_scale(), inputs.dtype)
        outputs = self._product(inputs, self.u, s, self.v)
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        return self.activation(outputs)

    def dense_kernel(self, active: np.ndarray) -> np.ndarray:
        """The kernel of the equivalent plain layer: U diag(s_eff) V reshaped (unit-norm
        U columns and V rows), where s_eff = s on the `active` components and 0 elsewhere."""
        s_eff = self.s.numpy() * active * self._norm_scale().numpy()
        matrix = (self.u.numpy() * s_eff) @ self.v.numpy()
        return matrix.reshape(self._kernel_shape())

    def to_plain(self, active: np.ndarray) -> plan_lib.PlainLayer:
        """The plain layer computing this layer's function with the components `active`."""
        weights = [self.dense_kernel(active)] + ([self.bias.numpy()] if self.use_bias else [])
        return plan_lib.PlainLayer(self.plain["class_name"], self.plain["config"], weights)

    def initial_weights(self, svd: tuple, bias: np.ndarray | None) -> list:
        """Weights in `build` order that start the layer at the top-`rank` SVD.

        Args:
            svd: (u, s, vt) of the kernel as a matrix (see `factored_layer`).
            bias: the plain layer's bias, if it has one.
        """
        u, s, vt = svd
        k = self.rank
        weights = [u[:, :k], s[:k], vt[:k]] + ([bias] if self.use_bias else [])
        flags = [np.ones(k, np.float32), np.int64(0), np.int64(0)]  # active, step, decided
        return [*weights, np.float32(INITIAL_THRESHOLD / self.pace), *flags]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "plain": self.plain,
            "rank": self.rank,
            "temperature": schedules.serialize(self.temperature),
            "s_max": self.s_max,
            "pace": self.pace,
        }

    def compression_note(self) -> str:
        return f"rank {int(self.soft_rank(hard=True))}/{self.rank} (searched)"


@keras.utils.register_keras_serializable(package="tfhybrid")
class FactoredDense(_Factored):
    """A Dense layer trained in factored form (see `_Factored`)."""

    plain_class = L.Dense

    def _rows(self, input_shape) -> int:
        return int(input_shape[-1])

    def _product(self, inputs, u, s, v):
        """x U diag(s) V, in factored order: cheaper than forming the kernel per batch."""
        if inputs.shape.rank == 2:
            return tf.matmul(tf.matmul(inputs, u) * s, v)
        hidden = tf.tensordot(inputs, u, [[inputs.shape.rank - 1], [0]]) * s
        return tf.tensordot(hidden, v, [[hidden.shape.rank - 1], [0]])

    def _kernel_shape(self) -> tuple:
        return (self.u.shape[0], self.units)


@keras.utils.register_keras_serializable(package="tfhybrid")
class FactoredConv2D(_Factored):
    """A Conv2D layer trained in factored form, its kernel a (k*k*c) x o matrix U diag(s) V.

    `strip` splits it into a k x k conv to r channels followed by a 1 x 1 conv.
    """

    plain_class = L.Conv2D

    def build(self, input_shape):
        self.channels_in = int(input_shape[-1])
        super().build(input_shape)

    def _rows(self, input_shape) -> int:
        return math.prod(self.plain["config"]["kernel_size"]) * int(input_shape[-1])

    def _product(self, inputs, u, s, v):
        """The conv with kernel U diag(s) V: one conv with the kernel formed from the
        factors, or a k x k conv to r channels and a 1 x 1 conv where that is cheaper
        (see `runs_as_two_convs`). Function and gradients are those of the factored form.

        A 1 x 1 conv runs as a matrix product over the channels: the same function,
        and on small batches a fraction of the conv's fixed cost per call (MobileNetV2
        at 32 x 32, batch 4: about 30 µs against 300 µs per pointwise layer and pass).
        The scale diag(s) goes on the smaller factor (see `_scaled_smaller_factor`).
        """
        config = self.plain["config"]
        strides, padding = config["strides"], config["padding"].upper()
        dilations = config["dilation_rate"]
        two_convs = self.runs_as_two_convs(inputs.shape)
        u, v = (tf.cast(f, inputs.dtype) for f in _scaled_smaller_factor(u, s, v))
        if self.is_pointwise():
            if tuple(strides) != (1, 1):
                inputs = inputs[:, :: strides[0], :: strides[1], :]
            if two_convs:
                return _channel_matmul(_channel_matmul(inputs, u), v)
            return _channel_matmul(inputs, tf.matmul(u, v))
        if two_convs:
            first = tf.reshape(u, (*config["kernel_size"], self.channels_in, self.rank))
            hidden = tf.nn.conv2d(inputs, first, strides, padding, dilations=dilations)
            return _channel_matmul(hidden, v)
        kernel = tf.reshape(tf.matmul(u, v), self._kernel_shape())
        return tf.nn.conv2d(inputs, kernel, strides, padding, dilations=dilations)

    def is_pointwise(self) -> bool:
        """Whether the conv is 1 x 1: a matrix product over the channels (of every
        stride-th position, whatever the padding)."""
        return tuple(self.plain["config"]["kernel_size"]) == (1, 1)

    def runs_as_two_convs(self, input_shape) -> bool:
        """Whether two convs need under half the MACs of forming the kernel and one conv.

        Forming the kernel costs k*k*c*r*o MACs once per batch; then the conv costs
        what the plain layer's does. Two convs cost r*(k*k*c + o) per position and
        example: less, the lower r, but they are one op more, so one conv is kept
        unless two save half. Where the batch is not static, Keras's default of 32
        stands in; where the output positions are not, the kernel is formed.
        """
        plain = self.plain_class.from_config(self.plain["config"])
        batch, *spatial, _ = plain.compute_output_shape(tuple(input_shape))
        if None in spatial:
            return False
        examples = (batch or 32) * math.prod(spatial)
        rows, rank, cols = self.u.shape[0], self.rank, self.units
        two_convs = examples * rank * (rows + cols)
        one_conv = rows * rank * cols + examples * rows * cols
        return 2 * two_convs < one_conv

    def _kernel_shape(self) -> tuple:
        return (*self.plain["config"]["kernel_size"], self.channels_in, self.units)


def _scaled_smaller_factor(u: tf.Tensor, s: tf.Tensor, v: tf.Tensor) -> tuple:
    """(U diag(s), V) or (U, diag(s) V), whichever scales fewer weights: the same product,
    and per step the scaling and its gradients pass over the smaller factor only."""
    if u.shape.num_elements() <= v.shape.num_elements():
        return u * s, v
    return u, s[:, None] * v


def _sum_of_squares(matrix: tf.Tensor, axis: int) -> tf.Tensor:
    """Sum of squares along `axis`, for the factors' norms in every training step.

    One pass over the matrix each way: the norm op reads it once (a square and a sum
    write and read a copy), and the gradient is one broadcast product (the generic
    one first copies the upstream gradient to the matrix's shape).
    """

    @tf.custom_gradient
    def summed(values):
        def gradient(upstream):
            return values * tf.expand_dims(2.0 * upstream, axis)

        return tf.square(tf.math.reduce_euclidean_norm(values, axis)), gradient

    return summed(tf.convert_to_tensor(matrix))


def _channel_matmul(inputs: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """`inputs` (channels last) times `matrix` over the channels: a 1 x 1 conv."""
    flat = tf.matmul(tf.reshape(inputs, (-1, matrix.shape[0])), matrix)
    inner = inputs.shape[1:-1]
    if inner.is_fully_defined():  # one reshape to a constant shape: fewer ops to trace
        return tf.reshape(flat, (-1, *inner, matrix.shape[1]))
    outputs = tf.reshape(flat, tf.concat([tf.shape(inputs)[:-1], matrix.shape[1:]], 0))
    outputs.set_shape(inputs.shape[:-1].concatenate(matrix.shape[1:]))
    return outputs


def searched_rank(kernel: np.ndarray) -> int:
    """Components worth searching: up to the break-even rank of a split (at most full)."""
    rows, cols = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
    return min(rows, cols, math.ceil(rows * cols / (rows + cols)))


def factored_layer(layer: Any, rank: int, temperature: dict) -> graph.Replacement:
    """A replacement calling the factored stand-in (same name) of a Dense / Conv2D."""
    kernel, *bias = layer.get_weights()
    svd = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), full_matrices=False)
    s_max = float(svd[1][0]) or 1.0
    cls = FactoredDense if isinstance(layer, L.Dense) else FactoredConv2D
    plain = {"class_name": type(layer).__name__, "config": layer.get_config()}
    factored = cls(plain, rank, temperature, s_max=s_max, name=layer.name)
    return graph.with_weights(factored, factored.initial_weights(svd, (bias or [None])[0]))


def _number(value: Any) -> Any:
    """A tensor's value as numpy (tuples element-wise); numbers as they are."""
    if isinstance(value, tuple):
        return tuple(_number(v) for v in value)
    return value.numpy() if tf.is_tensor(value) else value


class _Projection:
    """Hard decisions from the search's scores, projected onto the budget.

    Each unit (a channel of a gated group, a component of a factored layer) has a
    score, the logit of its soft decision at T = 1; a unit is kept when its score is
    positive. Counts are rounded up to multiples of `round_to`. While the budget is
    exceeded, the chunk of units whose removal costs least importance per unit of
    budget saved goes. Then, while a chunk still fits, the one that gives back most
    importance per unit of budget used returns: the search tends to end a little
    under budget (optimizer momentum carries past the point where the penalty
    stops), and budget left unused is capacity the fine-tuning could have used.
    """

    def __init__(
        self,
        model: Any,
        round_to: int,
        gates: Any,
        factored: list,
        least: int = 1,
        gives_back: bool = True,
    ):
        self.model = model
        self.round_to = round_to
        self.gives_back = gives_back
        self.least = {}  # key -> fewest units kept (a group's minimum channels)
        hard = model.decisions(hard=True)  # e.g. other layers' sparsity and clusters
        self.others = base.Decisions(
            **{
                field.name: {k: _number(v) for k, v in getattr(hard, field.name).items()}
                for field in dataclasses.fields(hard)
            }
        )
        self.scores: dict = {}  # ("group", gid) or ("rank", name) -> scores
        if gates is not None:
            for index, gid in enumerate(gates.group_ids):
                self.scores["group", gid] = gates.scores(index)
                self.least["group", gid] = least
        for layer in factored:
            self.scores["rank", layer.name] = layer.component_logits().numpy()

    def minimum(self, key) -> int:
        return min(max(self.round_to, self.least.get(key, 1)), len(self.scores[key]))

    def rounded(self, key, count: int) -> int:
        size = len(self.scores[key])
        return min(size, max(self.minimum(key), math.ceil(count / self.round_to) * self.round_to))

    def next_count(self, key, count: int) -> int:
        """The next smaller allowed count: a multiple of round_to, about 3% lower."""
        lower = (count - max(1, count // 32)) // self.round_to * self.round_to
        return max(self.minimum(key), lower)

    def next_larger_count(self, key, count: int) -> int:
        """The next larger allowed count: a multiple of round_to (or all), about 3% higher."""
        return self.rounded(key, count + max(1, count // 32))

    def run(self) -> tuple[dict, dict]:
        counts = {k: self.rounded(k, int(np.sum(v > 0))) for k, v in self.scores.items()}
        while not self.model.budget.met_by(self.ratios(counts)):
            key, chunk = self.cheapest_cut(counts)
            counts[key] -= chunk
        while self.gives_back and (addition := self.best_fitting_addition(counts)) is not None:
            key, chunk = addition
            counts[key] += chunk
        keep, active = {}, {}
        for (kind, name), scores in self.scores.items():
            kept = np.zeros(len(scores), bool)
            kept[np.argsort(-scores, kind="stable")[: counts[kind, name]]] = True
            (keep if kind == "group" else active)[name] = kept
        return keep, active

    def ratios(self, counts: dict) -> dict:
        original = self.model.original_cost
        return {k: float(v) / original[k] for k, v in self.cost(counts).items()}

    def cost(self, counts: dict) -> dict:
        """{"macs", "params", "bits"} of one set of counts, or of N if the counts are
        (N,) arrays."""
        groups = {gid: n for (kind, gid), n in counts.items() if kind == "group"}
        ranks = {name: n for (kind, name), n in counts.items() if kind == "rank"}
        others = self.others
        decided = dataclasses.replace(
            others, counts={**others.counts, **groups}, ranks={**others.ranks, **ranks}
        )
        return decided.costed_by(self.model.cost_model)

    def trials(self, counts: dict, changed: dict) -> tuple:
        """`counts` with one key at a time set to its count in `changed`, evaluated.

        Returns:
            (the changed keys; per trial, the budget it uses minus what `counts` uses,
            in shares of each constrained target, summed; per trial, its ratios)
        """
        keys = list(changed)
        trial = {k: np.array([changed[k] if c == k else counts[k] for c in keys]) for k in counts}
        now, after = self.cost(counts), self.cost(trial)
        original = self.model.original_cost
        ratios = {name: after[name] / original[name] for name in after}
        used = sum(
            (after[name] - now[name]) / original[name] / target
            for name, target in self.model.budget.targets().items()
        )
        return keys, np.atleast_1d(used), ratios

    def saving_cuts(self, counts: dict) -> tuple[dict, dict]:
        """(key -> its cut count, key -> the budget that cut uses, negative) for every
        key with a cut that saves some budget: the next smaller count, else, under a
        latency budget, smaller ones in turn down to the key's minimum (a measured
        latency can stay flat over many channels; under the other budgets the
        projection chooses as it always has)."""
        smaller, saved = dict(counts), {}
        pending = set(counts)
        deeper = "latency" in self.model.budget.targets()
        while pending:
            cuts = {k: self.next_count(k, smaller[k]) for k in pending}
            cuts = {k: n for k, n in cuts.items() if n < smaller[k]}
            if not cuts:
                break
            keys, used, _ = self.trials(counts, cuts)
            smaller.update(cuts)
            saved.update({key: used[j] for j, key in enumerate(keys) if used[j] < 0})
            pending = {key for j, key in enumerate(keys) if used[j] >= 0} if deeper else set()
        return smaller, saved

    def importance(self, key, start: int, stop: int) -> float:
        """Summed soft decisions (sigmoid of the score) of `key`'s units ranked start..stop."""
        ranked = np.sort(self.scores[key])[::-1][start:stop]
        return float(np.sum(1 / (1 + np.exp(-np.clip(ranked, -80.0, 80.0)))))

    def best_fitting_addition(self, counts: dict) -> tuple | None:
        """The (unit key, chunk) that fits the budget and gives back most importance
        per unit of budget used; None when no chunk fits."""
        larger = {k: self.next_larger_count(k, c) for k, c in counts.items()}
        changed = {k: n for k, n in larger.items() if n > counts[k]}
        if not changed:
            return None
        keys, used, ratios = self.trials(counts, changed)
        fits = [
            self.model.budget.met_by({n: r[j] for n, r in ratios.items()}) for j in range(len(keys))
        ]
        best, best_value = None, -np.inf
        for j in np.flatnonzero(fits):
            key = keys[j]
            gain = self.importance(key, counts[key], changed[key])
            value = gain / used[j] if used[j] > 0 else np.inf
            if value > best_value:
                best, best_value = (key, changed[key] - counts[key]), value
        return best

    def cheapest_cut(self, counts: dict) -> tuple:
        """The (unit key, chunk) whose removal buys budget at the least importance.

        A key's chunk is its next smaller count, or where that buys nothing (a measured
        latency can stay flat over many channels), the largest smaller count that does.
        """
        smaller, saved = self.saving_cuts(counts)
        best, best_price = None, np.inf
        for key, used in saved.items():
            price = self.importance(key, smaller[key], counts[key]) / -used
            if price < best_price:
                best, best_price = (key, counts[key] - smaller[key]), price
        if best is None:
            raise RuntimeError(
                f"No channel or rank left to remove, yet the budget {self.model.budget} is "
                f"not met (now {self.ratios(counts)}); hybrid_compress should have refused it."
            )
        return best


def gates_of(model: Any) -> ChannelGates | None:
    """The channel gates of a compression model under DF, or None."""
    return next((la for la in model.layers if type(la) is ChannelGates), None)


def factored_layers_of(model: Any) -> list[_Factored]:
    """The factored layers of a compression model under DF."""
    return [la for la in model.layers if isinstance(la, _Factored)]


@base.register_technique
class DF(base.Technique):
    """Filters (DML-S masks) and ranks (DTL-S thresholds) learned together (DF).

    Each prunable channel group gets a vector of mask logits, each Dense/Conv2D a
    factored form whose components a learnable threshold gates; the masks' and
    gates' soft counts enter the shared budget. At the search's end the decisions
    become hard and, if over budget, are projected onto it (the least important
    channels and components go). `strip` removes the masked channels and splits the
    layers whose kept rank needs fewer MACs split.

    Args:
        filters: learn which channels to remove.
        ranks: learn the rank of each Dense/Conv2D layer.
        round_to: keep channel counts and ranks multiples of this (e.g. 8).
        layers: only these layers (within `hybrid_compress`'s `layers`), e.g. to leave
            the others to a stacked technique.
        skip: never these layers (nor the channel groups they belong to).

    Raises:
        ValueError: for round_to < 1.
    """

    name = "df"

    def __init__(
        self,
        filters: bool = True,
        ranks: bool = True,
        round_to: int = 1,
        layers: list | None = None,
        skip: list | tuple = (),
    ):
        if int(round_to) < 1:
            raise ValueError(f"DF(round_to={round_to}): give a multiple of at least 1.")
        self.filters, self.ranks, self.round_to = bool(filters), bool(ranks), int(round_to)
        self.layers, self.skip = list(layers or []), list(skip)

    def get_config(self) -> dict:
        return {
            "filters": self.filters,
            "ranks": self.ranks,
            "round_to": self.round_to,
            "layers": self.layers,
            "skip": self.skip,
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        only, skip = setup.restricted("DF", self.layers, self.skip)
        named = setup.named | set(self.layers)
        chosen = _Choice(setup.analysis, self.filters, self.ranks, only, skip, named)
        chosen.check()
        original = setup.original
        fewest = max(self.round_to, self.least)
        _check_reachable(chosen, setup.cost_model, original, setup.budget, fewest)
        smallest = _smallest(chosen, fewest)
        chosen.ranks = {
            name: min(rank, keepable_rank(name, smallest, setup.cost_model, original, setup.budget))
            for name, rank in chosen.ranks.items()
        }
        self._setup = types.SimpleNamespace(analysis=setup.analysis, chosen=chosen)
        claims = {n: "channels" for g in chosen.groups for n in g.layers()}
        return {**claims, **dict.fromkeys(chosen.ranks, "rank")}

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Makes the gates that every masked tensor shares."""
        held = self._setup
        groups = held.chosen.groups
        held.temperature = temperature = setup.temperature
        held.gates = self.make_gates(groups, temperature) if groups else None
        held.gate_index = {g.id: i for i, g in enumerate(groups)}
        held.deferred = _masks_deferred(held.analysis.model)

    def make_gates(self, groups: list, temperature: dict) -> ChannelGates:
        """The layer holding the searched groups' channel decisions."""
        return ChannelGates(
            [g.id for g in groups],
            [list(g.key()) for g in groups],
            [g.size for g in groups],
            temperature,
            name="channel_gates",
        )

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if isinstance(op.layer, L.LayerNormalization):
            return self._normalized_over_gates(op)
        if isinstance(op.layer, L.MultiHeadAttention):
            return self._heads_gated(op)
        rank = self._setup.chosen.ranks.get(op.layer.name)
        return None if rank is None else factored_layer(op.layer, rank, self._setup.temperature)

    def _normalized_over_gates(self, op: graph.Op) -> graph.Replacement | None:
        """A LayerNormalization of gated channels counts each channel by its gate in its
        statistics, so hard gates compute what the pruned layer computes."""
        layout = self._gate_layout(self._setup.analysis.layout(op.inputs[0]))
        if all(index < 0 for index, _, _ in layout):
            return None
        norm, gates = surgery.MaskedLayerNormalization.of(op.layer), self._setup.gates

        def call(inputs, *args, **kwargs):
            weights = gates(inputs, layout=layout, mask_only=True)
            return norm(inputs, *args, channel_weights=weights, **kwargs)

        return call

    def _heads_gated(self, op: graph.Op) -> graph.Replacement | None:
        """An attention layer whose heads are searched scales each head's output by its
        gate, so a hard gate of 0 computes what the layer without that head computes."""
        group = self._setup.analysis.heads_group(op.layer.name)
        if group is None or group.id not in self._setup.gate_index:
            return None
        layout = self._gate_layout(((group.id, 1),))
        attention, gates = (
            HeadWeightedAttention.from_config(op.layer.get_config()),
            self._setup.gates,
        )
        weighted = graph.with_weights(attention, op.layer.get_weights())

        def call(query, *args, **kwargs):
            weights = gates(query, layout=layout, mask_only=True)
            return weighted(query, *args, head_weights=weights, **kwargs)

        return call

    def _gate_layout(self, layout) -> list:
        """A tensor's layout as `ChannelGates` reads it (see there)."""
        held = self._setup
        return [[held.gate_index.get(g, -1), held.analysis.groups[g].size, m] for g, m in layout]

    def wrap_outputs(self, op: graph.Op, call: graph.Replacement) -> graph.Replacement:
        held = self._setup
        layouts = [held.analysis.layout(kt) for kt in op.outputs]
        gated_groups = {gid for lay in layouts for gid, _ in lay} & held.gate_index.keys()
        # A scale-commuting layer's output carries its input's masks, unless they were
        # deferred to it.
        applied = isinstance(op.layer, SCALE_COMMUTING) and not any(
            id(kt) in held.deferred for kt in op.inputs
        )
        passed_on = all(id(kt) in held.deferred for kt in op.outputs)
        if not gated_groups or applied or passed_on:
            return call
        gate_layouts = [
            None if id(kt) in held.deferred else self._gate_layout(lay)
            for kt, lay in zip(op.outputs, layouts)
        ]
        gates = held.gates

        def gated(*args, **kwargs):
            outputs = tf.nest.flatten(call(*args, **kwargs))
            gated_outputs = [
                t if lay is None else gates(t, layout=lay) for t, lay in zip(outputs, gate_layouts)
            ]
            return gated_outputs if len(gated_outputs) > 1 else gated_outputs[0]

        return gated

    def initialize(self, model: Any, original: Any) -> None:
        gates = self.gates_of(model)
        if gates is None:
            return
        norms = magnitude.channel_l1_norms(original, self._setup.analysis)
        for gid, logits in zip(gates.group_ids, gates.logits):
            if gid in norms:
                logits.assign(staggered_logits(norms[gid]) / (gates.pace * LOGIT_SCALE))

    # -- its layers ----------------------------------------------------------------------
    def gates_of(self, model: Any) -> ChannelGates | None:
        """The layer holding this technique's channel decisions, or None."""
        return gates_of(model)

    def factored_of(self, model: Any) -> list:
        """This technique's factored layers."""
        return factored_layers_of(model)

    @property
    def least(self) -> int:
        """The fewest channels a searched group keeps."""
        return 1

    #: Whether the projection at the search's end gives back units that fit the budget.
    gives_back = True

    # -- training ----------------------------------------------------------------------
    def set_search_steps(self, model: Any, steps: int) -> None:
        """The masks' and gates' temperature follows the search's length, and a search
        shorter than PACED_STEPS moves their logits and thresholds faster."""
        for layer in self.layers_of(model):
            layer.temperature = model.temperature()
        for layer in self.decision_layers(model):
            layer.set_pace(max(1.0, PACED_STEPS / steps))

    def layers_of(self, model: Any) -> list:
        return self.decision_layers(model)

    def decision_layers(self, model: Any) -> list:
        """The layers holding the decisions: the gates and the factored layers."""
        gates = self.gates_of(model)
        return ([gates] if gates is not None else []) + self.factored_of(model)

    def compression_variables(self, model: Any) -> list[tf.Variable]:
        gates = self.gates_of(model)
        logits = list(gates.logits) if gates is not None else []
        return logits + [layer.tau for layer in self.factored_of(model)]

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        gates = self.gates_of(model)
        counts = {}
        if gates is not None:
            counts = {
                gid: tf.reduce_sum(gates.mask(index, hard))
                for index, gid in enumerate(gates.group_ids)
            }
        ranks = {la.name: la.soft_rank(hard) for la in self.factored_of(model)}
        return base.Decisions(counts=counts, ranks=ranks)

    def finish(self, model: Any) -> None:
        """Freezes the hard decisions, projected onto the budget: from then on every
        mask and gate reads them."""
        keep, active = self.hard_decisions(model)
        gates = self.gates_of(model)
        if gates is not None:
            for var, gid in zip(gates.keep, gates.group_ids):
                var.assign(keep[gid].astype(np.float32))
        for layer in self.factored_of(model):
            layer.active.assign(active[layer.name].astype(np.float32))

    def kept_channels(self, model: Any) -> dict:
        return self.hard_decisions(model)[0]

    def hard_decisions(self, model: Any) -> tuple[dict, dict]:
        """The channels kept per group and components kept per factored layer.

        After the search: the frozen decisions. During it: the current decisions,
        projected onto the budget (the model is not modified).

        Returns:
            (group id -> bool array over its channels,
             layer name -> bool array over its searched components)
        """
        gates, factored = self.gates_of(model), self.factored_of(model)
        if model.search_finished():
            keep = (
                {}
                if gates is None
                else {gid: var.numpy() > 0.5 for gid, var in zip(gates.group_ids, gates.keep)}
            )
            return keep, {la.name: la.active.numpy() > 0.5 for la in factored}
        projection = _Projection(model, self.round_to, gates, factored, self.least, self.gives_back)
        return projection.run()

    def plan(self, model: Any) -> plan_lib.Plan:
        """The gates go, masked channels and heads are removed, factored layers become
        plain ones kept at their rank (split where that needs fewer MACs), and the layer
        norms and attention layers that read the gates become plain ones again."""
        keep, active = self.hard_decisions(model)
        replace = {la.name: la.to_plain(active[la.name]) for la in self.factored_of(model)}
        for layer in model.layers:
            if isinstance(layer, surgery.MaskedLayerNormalization):
                replace[layer.name] = layer.plain()
            if isinstance(layer, HeadWeightedAttention):
                config, weights = layer.get_config(), layer.get_weights()
                replace[layer.name] = plan_lib.PlainLayer("MultiHeadAttention", config, weights)
        remove, gates = {}, self.gates_of(model)
        if gates is not None:
            replace[gates.name] = plan_lib.IDENTITY
            for gid, key in zip(gates.group_ids, gates.group_keys):
                removed = np.flatnonzero(~keep[gid])
                if removed.size:
                    remove[tuple(key)] = removed
        ranks = {name: int(np.sum(kept)) for name, kept in active.items()}
        return plan_lib.Plan.of(self.name, replace=replace, remove=remove, ranks=ranks)

    def scalars(self, model: Any) -> dict[str, float]:
        """What `strip` would keep now (`kept_channels/<producers>`, `rank/<layer>`), the
        search's own hard decisions before the projection (`search/...`), and the
        temperature."""
        keep, active = self.hard_decisions(model)
        gates, figures = self.gates_of(model), {}
        if gates is not None:
            figures["compression/temperature"] = float(gates.temperature(gates.step))
            for index, (gid, key) in enumerate(zip(gates.group_ids, gates.group_keys)):
                producers = "+".join(key)
                figures[f"kept_channels/{producers}"] = int(np.sum(keep[gid]))
                current = int(np.sum(gates.mask(index, hard=True).numpy()))
                figures[f"search/kept_channels/{producers}"] = current
        for layer in self.factored_of(model):
            figures[f"rank/{layer.name}"] = int(np.sum(active[layer.name]))
            figures[f"search/rank/{layer.name}"] = int(layer.soft_rank(hard=True).numpy())
        return figures


def staggered_logits(norms: np.ndarray) -> np.ndarray:
    """A group's initial mask logits: evenly spaced by the rank of its channels' norms,
    INITIAL_LOGIT -/+ INITIAL_SPREAD for the smallest/largest (see INITIAL_SPREAD)."""
    order = np.argsort(np.argsort(norms, kind="stable"), kind="stable")
    share = order / max(1, len(norms) - 1)
    return (INITIAL_LOGIT + INITIAL_SPREAD * (2 * share - 1)).astype(np.float32)


def _masks_deferred(model: Any) -> set[int]:
    """Ids of the tensors whose masks the layers after them apply instead.

    A per-channel mask commutes with pooling, padding, flatten and dropout, so a
    tensor that only such layers consume passes its masks on: multiplying the
    pooled tensor costs a fraction of multiplying the producer's output.
    """
    outputs = {id(kt) for kt in tf.nest.flatten(model.outputs)}
    return {
        tensor
        for tensor, calls in graph.consumers(model).items()
        if tensor not in outputs and all(isinstance(op.layer, SCALE_COMMUTING) for op in calls)
    }


class _Choice:
    """Which groups get masks and which layers get ranks, and why the others not."""

    def __init__(self, analysis, filters: bool, ranks: bool, only: set, skip: set, named: set):
        self.groups, self.ranks, self.why_not = [], {}, []
        self.named = named
        self._why_no_channels, self._why_no_rank = {}, {}  # for the layers in `named`
        for group in analysis.groups:
            names = set(group.layers())
            producers = set(group.layers("produces") + group.layers("heads"))
            if not filters:
                reason = "filters=False"
            elif not group.prunable:
                reason = group.reason
            elif group.size < 2:
                reason = "it has a single channel"
            elif names & skip:
                reason = f"it touches skipped layers {sorted(names & skip)}"
            elif only and not producers & only:
                reason = f"none of its producers {sorted(producers)} is in `layers`"
            else:
                self.groups.append(group)
                continue
            self.why_not.append(f"group {group.id} ({', '.join(sorted(producers))}): {reason}")
            self._why_no_channels.update(dict.fromkeys(producers & named, reason))
        for layer in analysis.model.layers:
            if layer.name in skip or (only and layer.name not in only):
                continue
            reason = "ranks=False" if not ranks else _why_not_factored(layer)
            if reason is None:
                self.ranks[layer.name] = searched_rank(layer.get_weights()[0])
            elif layer.name in named:
                self._why_no_rank[layer.name] = reason

    def left_out(self) -> list[str]:
        """One line per layer named in `layers` that neither masks nor a rank compress."""
        thinned = {n for g in self.groups for n in g.layers("produces") + g.layers("passes")}
        return [
            f"{name}: channels: "
            + self._why_no_channels.get(name, "they follow the layer that produces them")
            + f"; rank: {self._why_no_rank.get(name, 'it is skipped')}"
            for name in sorted(self.named - thinned - set(self.ranks))
        ]

    def check(self) -> None:
        """Raises if nothing can be compressed; warns of layers named in `layers` that
        will not be."""
        left_out = self.left_out()
        if not self.groups and not self.ranks:
            per_layer = "\nPer layer named in `layers`:\n  " + "\n  ".join(left_out)
            raise ValueError(
                "Nothing to compress: no channel group can be pruned and no Dense/Conv2D "
                "layer can be factored. Per group:\n  "
                + "\n  ".join(self.why_not)
                + (per_layer if left_out else "")
            )
        if left_out:
            warnings.warn(
                "tfhybrid leaves these layers named in `layers` uncompressed:\n  "
                + "\n  ".join(left_out),
                stacklevel=5,
            )


def _why_not_factored(layer: L.Layer) -> str | None:
    """Why rank selection cannot take `layer`, or None if it can."""
    if not is_factorable(layer):
        return (
            "rank selection takes Dense and plain channels-last Conv2D layers, not "
            f"{type(layer).__name__} (groups={getattr(layer, 'groups', 1)})"
        )
    if searched_rank(layer.get_weights()[0]) < 2:
        return "a split of its kernel never needs fewer MACs"
    return None


def _smallest(chosen, round_to: int) -> tuple[dict, dict]:
    """(counts, ranks) of the smallest model the search may reach."""
    counts = {g.id: min(round_to, g.size) for g in chosen.groups}
    ranks = {name: min(round_to, r) for name, r in chosen.ranks.items()}
    return counts, ranks


def _check_reachable(chosen, cost_model, original, budget, round_to) -> None:
    """Raises if even the smallest allowed model exceeds the budget."""
    costs = cost_model.costs(*_smallest(chosen, round_to))
    smallest = {k: float(v) / original[k] for k, v in costs.items()}
    if not budget.met_by(smallest):
        floor = ", ".join(f"{k}={v:.4f}" for k, v in smallest.items())
        raise ValueError(
            f"{budget} cannot be met: the parts of the model that cannot be compressed "
            f"alone need {floor} of the original (every searched group at {round_to} "
            f"channel(s), every searched layer at rank {round_to}). Raise the budget, "
            "or compress more layers."
        )


def keepable_rank(
    name: str,
    smallest: tuple,
    cost_model: cost.CostModel,
    original: tuple,
    budget: budget_lib.Budget,
) -> int:
    """The most components of layer `name` that a model within the budget can use.

    Every other part of the model at its smallest leaves some room. Split at rank r,
    the layer needs r * (rows + cols) of it at its narrowest; whole, its kernel has
    rank at most min(rows, cols) with rows * cols within the room. More components
    are never kept split and add nothing to a whole kernel, so they are not
    searched: they would only cost time (LeNet-300-100's fc1 at 10% of the MACs: 33
    of its 217 break-even components).

    Args:
        name: a layer under rank search.
        smallest: (counts, ranks) of the smallest model the search may reach.
        cost_model: the model's `cost.CostModel`.
        original: {"macs", "params", "bits"} of the original model.
        budget: the `Budget`.

    Returns:
        An upper bound on the components any model within the budget keeps.
    """
    counts, ranks = smallest
    rest = cost_model.costs(counts, {**ranks, name: 0})
    rows, cols, positions = cost_model.kernel_matrix(name, counts)
    full_rows, full_cols, _ = cost_model.kernel_matrix(name)
    limit = original
    per_weight = {"macs": positions, "params": 1.0, "bits": 32.0}
    bounds = [min(full_rows, full_cols)]
    for kind, share in budget.targets().items():
        if kind not in per_weight:
            continue  # latency: not linear in the weights, no bound from it
        room = (share * limit[kind] - rest[kind]) / per_weight[kind]
        whole = _largest_square((rows, full_rows), (cols, full_cols), room)
        bounds.append(max(room / (rows + cols), whole))
    return max(0, math.floor(min(bounds) + 1e-9))


def _largest_square(a_range: tuple, b_range: tuple, area: float) -> float:
    """The largest min(a, b) with a and b in their ranges and a * b <= area (0: none)."""
    (a_low, a_high), (b_low, b_high) = a_range, b_range
    if a_low * b_low > area:
        return 0.0
    side = min(math.sqrt(area), a_high, b_high)
    if a_low > side:
        return min(a_low, b_high, area / a_low)
    if b_low > side:
        return min(b_low, a_high, area / b_low)
    return side
