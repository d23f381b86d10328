"""DHP: channels pruned through hypernetworks that generate the kernels from latent vectors.

After Li, Gu, Zhang, Van Gool and Timofte (2020), "DHP: Differentiable Meta Pruning via
HyperNetworks" (arXiv 2003.13683), and their public PyTorch code.

- One latent vector z per channel group under search (`Latents`), shared by every layer
  the group's channels pass through: a residual stage, a concatenation or a depthwise
  layer reads its group's vector, found by the channel analysis, not written per network.
- Each Dense, Conv2D and DepthwiseConv2D that reads or writes a searched group gets its
  kernel from a small hypernetwork (`HyperKernel`): for each input channel i and output
  channel o, the latent product Z = ẑ_in[i]·ẑ_out[o] + B0, the embedding
  E = Z·W1 + B1 (`embedding` values), and the kernel's k×k taps W2·E + B2. A depthwise
  kernel's channel c, multiplier m reads ẑ_out[c·M + m] alone.
- After every training step a proximal step on the latents, z ← sign(z)·max(|z| − γ·lr, 0)
  (lr: the compression optimizer's), drives entries to exactly zero; a channel whose
  |ẑ| falls below `threshold` is pruned. A group stops shrinking at `min_channels`, and
  its `min_channels` largest latents are never shrunk (one step of a large γ would
  otherwise zero a whole group at once).
- The search ends when the hard MACs/params ratios meet the budget (within `tolerance`),
  or at `search_steps`; the latents go back to before the last proximal step (which may
  have overshot), the decisions are projected onto the budget, the kernels
  emitted once, and from then on each layer trains its emitted kernel as a plain one
  (the hypernetworks are dropped) with the pruned channels masked. `strip` removes them.

Choices of ours (the paper trains from scratch with latents drawn at random):

- ẑ = z / max|z| per group: the kernels read each latent relative to its group's largest.
  With z itself, the proximal step shrinks every kernel of a network with no BatchNorm
  (LeNet-5's output scales with the product of its latents); relative, the largest
  latent keeps its channels' kernels while the small ones fade to zero.
- The hypernetwork starts reproducing the model's kernels exactly: z = 1, B0 = B1 = B2 = 0,
  W1 drawn as in their code, and W2 = K·W1/|W1|² per (i, o). Every kernel then scales
  with its channels' latents, so a latent shrinking to zero fades its channel out of the
  network continuously, and a model from scratch (Keras's initial kernels) or a
  pretrained one start the same way.
- γ defaults to 2 / (lr · search_steps): a latent with no gradient reaches zero in half the
  search. The paper's γ (2e-4, with SGD at lr 0.1) assumes SGD's step sizes; the
  compression optimizer is Adam by default.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import graph
from tfhybrid import plan as plan_lib
from tfhybrid._keras import call_with_kernel, is_factorable, keras
from tfhybrid.blocks import kernel_of
from tfhybrid.techniques import base, df, magnitude
from tfhybrid.techniques.sparse import with_inner_weights

L = keras.layers

#: The projection onto the budget ranks channels by SCORE_SCALE·(|ẑ| − threshold): kept
#: when positive, and about linear in |ẑ| through the sigmoid `df._Projection` sums.
SCORE_SCALE = 4.0


@keras.utils.register_keras_serializable(package="tfhybrid")
class Latents(df.ChannelGates):
    """The latent vectors of the channel groups under search, one entry per channel.

    Called like `df.ChannelGates` (once per tensor, with its layout); with
    `latent=True` it gives the tensor's channels' relative latents ẑ = z / max|z| (ones
    for groups not searched), which `HyperKernel` reads. Channels are not masked during
    the search (as in the paper); once decided, the pruned ones are.

    Args:
        group_ids, group_keys, sizes, temperature: as for `df.ChannelGates`.
        threshold: |ẑ| below which a channel is pruned.
        least: the fewest channels a group keeps (its largest |z|).
    """

    def __init__(self, *args, threshold: float = 5e-3, least: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = float(threshold)
        self.least = int(least)

    def build(self, input_shape):
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA  # the proximal step runs per replica
        self.latents = [
            self.add_weight(f"latents_{i}", shape=(n,), initializer="ones", aggregation=first)
            for i, n in enumerate(self.sizes)
        ]
        self.keep = [
            self.add_weight(f"keep_{i}", shape=(n,), initializer="ones", trainable=False)
            for i, n in enumerate(self.sizes)
        ]
        self.before_last_step = [  # the latents before the last proximal step
            self.add_weight(
                f"before_last_step_{i}",
                shape=(n,),
                initializer="ones",
                trainable=False,
                aggregation=first,
            )
            for i, n in enumerate(self.sizes)
        ]
        self.reached = self.add_weight(  # 1 once the search's decisions met the budget
            "reached",
            shape=(),
            dtype=tf.int64,
            initializer="zeros",
            trainable=False,
            aggregation=first,
        )
        base.add_search_state(self)
        L.Layer.build(self, input_shape)

    def relative(self, index: int) -> tf.Tensor:
        """ẑ = z / max|z| of searched group `index`."""
        return self._memo(("relative", index), lambda: _relative(self.latents[index]))

    def _mask(self, index: int, hard: bool) -> tf.Tensor:
        if hard:
            current = tf.cast(self.kept_now(self.latents[index]), tf.float32)
        else:
            current = tf.ones_like(self.latents[index])
        return tf.where(self.decided > 0, self.keep[index], current)

    def kept_now(self, latent: tf.Tensor) -> tf.Tensor:
        """The channels whose |ẑ| reaches the threshold, and at least the `least` largest."""
        magnitude = tf.abs(_relative(latent))
        least = min(self.least, int(latent.shape[0]))
        floor = tf.reduce_min(tf.math.top_k(magnitude, least).values)
        return magnitude >= tf.minimum(self.threshold, floor)

    def scores(self, index: int) -> np.ndarray:
        return SCORE_SCALE * (np.abs(self.relative(index).numpy()) - self.threshold)

    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, layout=(), mask_only=False, latent=False, training=None):
        """As `df.ChannelGates.call`; with `latent`, the relative latents of `layout`."""
        if not latent:
            return super().call(inputs, layout=layout, mask_only=mask_only)
        key = ("latent", tuple(tuple(segment) for segment in layout))
        return tf.cast(self._memo(key, lambda: self.laid_out(layout, self.relative)), inputs.dtype)

    def set_pace(self, pace: float) -> None:
        """The latents' pace is DHP's proximal step (`gamma`), not a scale of theirs."""

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold, "least": self.least}

    def compression_note(self) -> str:
        kept = sum(int(np.sum(m)) for m in self.masks(hard=True))
        return f"latents of {len(self.sizes)} groups, kept {kept}/{sum(self.sizes)} channels"


def _relative(latent: tf.Tensor) -> tf.Tensor:
    return latent / tf.maximum(tf.reduce_max(tf.abs(latent)), 1e-12)


@keras.utils.register_keras_serializable(package="tfhybrid")
class HyperKernel(L.Wrapper):
    """A Dense, Conv2D or DepthwiseConv2D whose kernel a hypernetwork generates (see the
    module) during the search; once decided, it computes with its own kernel, which
    `DHP.finish` sets to the last generated one.

    Called with `latent_in` and `latent_out`, the relative latents of its input's and
    output's channels (`Latents`). The hypernetwork's weights train with the user's
    optimizer, as the kernel they stand for would.

    Args:
        layer: the layer.
        embedding: values per (input, output) channel pair of the embedding.
        layouts: [input layout, output layout] as `Latents` reads them.
    """

    def __init__(self, layer, embedding: int = 8, layouts=((), ()), **kwargs):
        super().__init__(layer, **kwargs)
        self.embedding = int(embedding)
        self.layouts = [[list(s) for s in layout] for layout in layouts]

    def build(self, input_shape):
        if not self.layer.built:
            with tf.name_scope(self.layer.name):  # its own names, for the optimizer's slots
                self.layer.build(input_shape)
        rows, cols, taps = self.generator_shape
        e = self.embedding
        bound = math.sqrt(3.0)
        fan_in = math.sqrt(3.0 / (e * rows * taps))
        uniform = keras.initializers.RandomUniform
        self.w1 = self.add_weight("w1", (rows, cols, e), initializer=uniform(-bound, bound))
        self.w2 = self.add_weight("w2", (rows, cols, taps, e), initializer=uniform(-fan_in, fan_in))
        self.b0 = self.add_weight("b0", (rows, cols), initializer="zeros")
        self.b1 = self.add_weight("b1", (rows, cols, e), initializer="zeros")
        self.b2 = self.add_weight("b2", (rows, cols, taps), initializer="zeros")
        base.add_search_state(self)
        super().build(input_shape)

    @property
    def kernel(self) -> tf.Variable:
        """The layer's kernel (a DepthwiseConv2D's depthwise kernel)."""
        return kernel_of(self.layer)

    @property
    def depthwise(self) -> bool:
        return type(self.layer) is L.DepthwiseConv2D

    @property
    def generator_shape(self) -> tuple[int, int, int]:
        """(rows, cols, taps): a kernel (kh, kw, rows, cols), a Dense's (rows, cols)."""
        shape = [int(d) for d in self.kernel.shape]
        if len(shape) == 2:
            return shape[0], shape[1], 1
        return shape[2], shape[3], shape[0] * shape[1]

    def latent_product(self, latent_in: tf.Tensor, latent_out: tf.Tensor) -> tf.Tensor:
        """Z without B0: ẑ_in[i]·ẑ_out[o], or a depthwise kernel's ẑ_out[c·M + m]."""
        rows, cols, _ = self.generator_shape
        if self.depthwise:
            return tf.reshape(latent_out, (rows, cols))
        return latent_in[:, None] * latent_out[None, :]

    def generated(self, latent_in: tf.Tensor, latent_out: tf.Tensor) -> tf.Tensor:
        """The kernel the hypernetwork generates from these latents."""
        z = self.latent_product(latent_in, latent_out) + self.b0
        embedded = z[..., None] * self.w1 + self.b1
        # An elementwise product summed, not an einsum: that runs a (1, e) x (e, 1) matmul
        # per channel pair, 3.5x slower for a Dense kernel on a CPU.
        taps = tf.reduce_sum(self.w2 * embedded[:, :, None, :], axis=-1) + self.b2
        return self._as_kernel(taps)

    def _as_kernel(self, taps: tf.Tensor) -> tf.Tensor:
        shape = self.kernel.shape
        if len(shape) == 2:
            return tf.reshape(taps, shape)
        rows, cols, _ = self.generator_shape
        return tf.transpose(tf.reshape(taps, (rows, cols, shape[0], shape[1])), (2, 3, 0, 1))

    def reproduce(self, kernel: np.ndarray, latent_in: tf.Tensor, latent_out: tf.Tensor) -> None:
        """Sets the hypernetwork so that these latents generate `kernel` exactly, each
        (input, output) pair's taps in proportion to its latent product (a pair whose
        product is zero keeps its taps in B2)."""
        rows, cols, taps = self.generator_shape
        if kernel.ndim == 2:
            per_pair = kernel.reshape(rows, cols, 1)
        else:
            per_pair = np.transpose(kernel, (2, 3, 0, 1)).reshape(rows, cols, taps)
        product = self.latent_product(latent_in, latent_out).numpy()
        live = np.abs(product) > 1e-6
        w1 = self.w1.numpy()
        direction = w1 / np.maximum(np.sum(w1**2, axis=-1, keepdims=True), 1e-12)
        direction /= np.where(live, product, 1.0)[..., None]
        self.w2.assign(
            np.where(live[..., None, None], per_pair[..., None], 0.0) * direction[:, :, None, :]
        )
        self.b2.assign(np.where(live[..., None], 0.0, per_pair))
        for bias in (self.b0, self.b1):
            bias.assign(tf.zeros_like(bias))

    def call(self, inputs, latent_in=None, latent_out=None, training=None):  # noqa: ARG002
        kernel = tf.cond(  # once decided, the hypernetwork is not run at all
            self.decided > 0,
            lambda: tf.identity(self.kernel),
            lambda: self.generated(latent_in, latent_out),
        )
        return call_with_kernel(self.layer, inputs, kernel)

    def get_config(self) -> dict:
        return {**super().get_config(), "embedding": self.embedding, "layouts": self.layouts}

    def compression_note(self) -> str:
        return "kernel generated by a DHP hypernetwork"


def _why_not_generated(layer: Any) -> str | None:
    """Why DHP cannot generate `layer`'s kernel, or None if it can."""
    if type(layer) is L.DepthwiseConv2D:
        return None if layer.data_format == "channels_last" else "it is channels-first"
    if is_factorable(layer):
        return None
    return (
        "DHP generates Dense, Conv2D (channels-last, not grouped) and DepthwiseConv2D "
        f"kernels, not {type(layer).__name__}"
    )


@base.register_technique
class DHP(df.DF):
    """Channel pruning by hypernetwork-generated kernels and sparse latents (see the module).

    Args:
        gamma: the proximal step's weight γ: each step shrinks every latent by γ·lr
            (lr: the compression optimizer's). None: 2 / (lr · search_steps), so a latent
            with no gradient reaches zero in half the search.
        embedding: values of the hypernetwork's embedding per channel pair (the paper's 8).
        min_channels: the fewest channels a group keeps (the paper's 4; fewer where a
            group has fewer).
        threshold: |ẑ| = |z| / max|z| below which a channel is pruned.
        tolerance: the search ends once the hard ratios are within the budget plus this
            share of the original; the projection at its end then meets the budget.
        layers, skip: restrict it (as for `DF`).

    Raises:
        ValueError: for gamma <= 0, embedding or min_channels < 1, a threshold outside
            (0, 1) or a negative tolerance.
    """

    name = "dhp"

    def __init__(
        self,
        gamma: float | None = None,
        embedding: int = 8,
        min_channels: int = 4,
        threshold: float = 5e-3,
        tolerance: float = 0.01,
        layers: list | None = None,
        skip: list | tuple = (),
    ):
        super().__init__(filters=True, ranks=False, round_to=1, layers=layers, skip=skip)
        checks = (
            (gamma is None or gamma > 0, f"gamma={gamma}: give a weight above 0 (or None)"),
            (int(embedding) >= 1, f"embedding={embedding}: give at least 1"),
            (int(min_channels) >= 1, f"min_channels={min_channels}: give at least 1"),
            (0 < threshold < 1, f"threshold={threshold}: give a share of |z|'s max in (0, 1)"),
            (tolerance >= 0, f"tolerance={tolerance}: give a share of at least 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DHP({message}).")
        self.gamma = None if gamma is None else float(gamma)
        self.embedding, self.min_channels = int(embedding), int(min_channels)
        self.threshold, self.tolerance = float(threshold), float(tolerance)

    def get_config(self) -> dict:
        return {
            "gamma": self.gamma,
            "embedding": self.embedding,
            "min_channels": self.min_channels,
            "threshold": self.threshold,
            "tolerance": self.tolerance,
            "layers": self.layers,
            "skip": self.skip,
        }

    @property
    def least(self) -> int:
        return self.min_channels

    #: A latent at zero removed its channel: the projection only cuts, never gives back.
    gives_back = False

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        """DF's channel groups (filters only); the kernels that read or write them are
        generated. Layers touching a group that DHP cannot generate keep their kernels,
        named in a warning."""
        claims = super().select(setup)
        searched = {g.id for g in self._setup.chosen.groups}
        only, skip = setup.restricted("DHP", self.layers, self.skip)
        generated, left = [], []
        for op in graph.ops(setup.analysis.model):
            layer = op.layer
            if not hasattr(layer, "kernel") and not hasattr(layer, "depthwise_kernel"):
                continue
            touched = {g for kt in (*op.inputs[:1], *op.outputs) for g, _ in self._layout(kt)}
            if not touched & searched or layer.name in skip or (only and layer.name not in only):
                continue
            reason = _why_not_generated(layer)
            (left.append(f"{layer.name}: {reason}") if reason else generated.append(layer.name))
        if left:
            warnings.warn(
                "DHP leaves these kernels as they are (their channels are still pruned):\n  "
                + "\n  ".join(left),
                stacklevel=4,
            )
        self._setup.generated = set(generated)
        return {**claims, **dict.fromkeys(generated, "weights")}

    def _layout(self, tensor: Any) -> tuple:
        return self._setup.analysis.layout(tensor)

    def make_gates(self, groups: list, temperature: dict) -> Latents:
        return Latents(
            [g.id for g in groups],
            [list(g.key()) for g in groups],
            [g.size for g in groups],
            temperature,
            threshold=self.threshold,
            least=self.min_channels,
            name="dhp_latents",
        )

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if op.layer.name not in self._setup.generated:
            return super().replace_layer(op)
        layouts = [self._gate_layout(self._layout(kt)) for kt in (op.inputs[0], op.outputs[0])]
        hyper = HyperKernel(
            graph.clone_layer(op.layer), self.embedding, layouts, name=f"dhp_{op.layer.name}"
        )
        call, latents = with_inner_weights(hyper, op.layer.get_weights()), self._setup.gates

        def generated(inputs, *args, **kwargs):
            latent_in, latent_out = (latents(inputs, layout=lay, latent=True) for lay in layouts)
            return call(inputs, *args, latent_in=latent_in, latent_out=latent_out, **kwargs)

        return generated

    def initialize(self, model: Any, original: Any) -> None:
        """Each group's latents start at its channels' L1 norms over the largest (so the
        proximal step reaches the weakest first), and each hypernetwork reproduces its
        layer's kernel from them."""
        latents = self.gates_of(model)
        if latents is None:
            return
        norms = magnitude.channel_l1_norms(original, self._setup.analysis)
        for gid, latent, before in zip(
            latents.group_ids, latents.latents, latents.before_last_step
        ):
            if gid in norms:
                latent.assign((norms[gid] / max(np.max(norms[gid]), 1e-12)).astype(np.float32))
            before.assign(latent)
        for hyper in self.hypers_of(model):
            read = (latents.laid_out(lay, latents.relative) for lay in hyper.layouts)
            hyper.reproduce(hyper.kernel.numpy(), *read)

    # -- its layers ----------------------------------------------------------------------
    def gates_of(self, model: Any) -> Latents | None:
        return next((la for la in model.layers if isinstance(la, Latents)), None)

    def factored_of(self, model: Any) -> list:
        return []

    def hypers_of(self, model: Any) -> list[HyperKernel]:
        """The layers whose kernels a hypernetwork generates."""
        return [la for la in model.layers if isinstance(la, HyperKernel)]

    def layers_of(self, model: Any) -> list:
        return super().layers_of(model) + self.hypers_of(model)

    # -- training ----------------------------------------------------------------------
    def compression_variables(self, model: Any) -> list[tf.Variable]:
        latents = self.gates_of(model)
        return [] if latents is None else list(latents.latents)

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:  # noqa: ARG002
        """The channels kept now (DHP has no soft count: the budget drives it through
        the proximal step and the stopping rule, not through the penalty)."""
        latents = self.gates_of(model)
        if latents is None:
            return base.Decisions()
        masks = (latents.mask(i, hard=True) for i in range(len(latents.sizes)))
        return base.Decisions(
            counts={gid: tf.reduce_sum(m) for gid, m in zip(latents.group_ids, masks)}
        )

    def after_step(self, model: Any) -> None:
        """The proximal step on the latents of every group above its minimum (its
        `min_channels` largest are never shrunk), until the search's hard ratios meet the
        budget (then `reached` is set)."""
        latents = self.gates_of(model)
        if latents is None:
            return
        ratios = model.ratios(hard=True)
        met = [ratios[k] <= v + self.tolerance for k, v in model.budget.targets().items()]
        reached = tf.reduce_all(tf.stack(met))
        latents.reached.assign(tf.cast(reached, tf.int64))
        shrink = self.proximal_threshold(model)
        searching = tf.logical_and(tf.logical_not(reached), latents.decided < 1)
        for latent, before in zip(latents.latents, latents.before_last_step):
            before.assign(tf.where(searching, latent, before))
            magnitude = tf.abs(latent)
            least = min(latents.least, int(latent.shape[0]))
            kept = tf.reduce_min(tf.math.top_k(magnitude, least).values)
            above = tf.reduce_sum(tf.cast(latents.kept_now(latent), tf.int32)) > least
            thinned = tf.sign(latent) * tf.nn.relu(magnitude - shrink)
            shrinks = tf.logical_and(tf.logical_and(searching, above), magnitude < kept)
            latent.assign(tf.where(shrinks, thinned, latent))

    def proximal_threshold(self, model: Any) -> tf.Tensor:
        """γ·lr of one step (see `gamma`)."""
        rate = model.compression_optimizer.learning_rate
        if callable(rate):
            rate = rate(model.compression_optimizer.iterations)
        rate = tf.cast(rate, tf.float32)
        if self.gamma is not None:
            return self.gamma * rate
        return tf.constant(2.0 / max(1, model.search_steps or 1), tf.float32)

    def search_done(self, model: Any) -> bool:
        latents = self.gates_of(model)
        return latents is not None and bool(latents.reached.numpy())

    def finish(self, model: Any) -> None:
        """The channels projected onto the budget; each kernel emitted once, from then on
        trained as a plain one.

        A search that met the budget goes back to its latents before the last proximal
        step: that step may have zeroed many channels at once (latents close together
        cross zero together) and overshot the budget; the projection then removes the
        weakest of them, one at a time, until the budget holds."""
        latents = self.gates_of(model)
        if latents is None:
            return
        if self.search_done(model):
            for latent, before in zip(latents.latents, latents.before_last_step):
                latent.assign(before)
        for hyper in self.hypers_of(model):
            hyper.kernel.assign(self.emitted(latents, hyper))
        super().finish(model)

    def emitted(self, latents: Latents, hyper: HyperKernel) -> tf.Tensor:
        """Eagerly, the kernel `hyper`'s hypernetwork generates now."""
        read = (latents.laid_out(lay, latents.relative) for lay in hyper.layouts)
        return hyper.generated(*read)

    def plan(self, model: Any) -> plan_lib.Plan:
        """DF's plan (the latents go, pruned channels are removed) and each generated
        layer with its kernel (mid-search: the one its hypernetwork generates now)."""
        latents, replace = self.gates_of(model), {}
        for hyper in self.hypers_of(model):
            weights = [w.numpy() for w in hyper.layer.weights]
            if not model.search_finished():
                weights[0] = self.emitted(latents, hyper).numpy()
            replace[hyper.name] = plan_lib.PlainLayer.of(hyper.layer, weights)
        return super().plan(model).merge(plan_lib.Plan.of(self.name, replace=replace))

    def scalars(self, model: Any) -> dict[str, float]:
        """DF's channel figures, and whether the search has met the budget."""
        figures = super().scalars(model)
        figures.pop("compression/temperature", None)
        latents = self.gates_of(model)
        if latents is not None:
            figures["dhp/reached"] = int(latents.reached.numpy())
        return figures


__all__ = ["DHP", "HyperKernel", "Latents"]
