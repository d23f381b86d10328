"""Unify: micro-structured weight unification and pruning, trained by ADMM.

After Lin, Jiang, Wang, Xu, Wang, Liu and Li (2021), arXiv 2106.08301. Each kernel is
cut into small blocks of weights. In a *unified* block every weight has the same
magnitude and keeps its own sign: the block stores one magnitude and a sign bit per
weight, and a dot product over it needs one multiply. A *pruned* block is all zero and
stores nothing. The other blocks stay float32. The magnitudes are stored in
`magnitude_bits` bits each, as multiples of one float32 step per kernel (8 by
default: a unified 1 x 4 block then stores 12 bits, not 36).

Training is ADMM (`tfhybrid.constraints`): during the search the weights W train with
the penalty rho/2 ||W - Z + U||^2, every `update_every` steps Z becomes the projection
of W + U onto the kernels with the required shares of unified and pruned blocks and U
gathers W - Z, and rho rises geometrically. At the search's end W is projected: each
block's kind and signs are frozen, and fine-tuning trains one magnitude per unified
block (the mean of sign * w over the block, rounded to its kernel's grid with the
gradient passed straight through) while pruned blocks stay zero.

The projection, per block: the closest unified block is sign(w) * mean|w| (error
sum w^2 - n mean|w|^2), the closest pruned one zero (error sum w^2). The `prune` share
of blocks with the least error when pruned go first, then the `unify` share of the
rest with the least error when unified. That order is exact when only one kind is
asked for; with both, it favours pruning the smallest blocks.

Blocks and what they store: `tfhybrid.blocks`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import constraints, graph, plan, schedules
from tfhybrid._keras import call_with_kernel, is_grouped, keras
from tfhybrid.blocks import (
    BLOCKED_LAYERS,
    FLOAT_MAGNITUDES,
    FREE,
    PRUNED,
    UNIFIED,
    BlockLayout,
    BlockShares,
    blocked_shape,
    in_blocks,
    kernel_of,
    quantized,
    signs,
)
from tfhybrid.techniques import base
from tfhybrid.techniques.sparse import with_inner_weights

L = keras.layers

#: The weights' ADMM penalty rises geometrically over the search, from a pull that the
#: task gradient outweighs to one that holds the weights near the constrained set.
DEFAULT_RHO = (1e-3, 1.0)

#: Bits of a unified block's magnitude: 256 levels of one step per kernel.
DEFAULT_MAGNITUDE_BITS = 8


def project(
    kernel: tf.Tensor,
    layout: BlockLayout,
    unify: float,
    prune: float,
    kept: np.ndarray | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The kernel with the shares of its blocks unified and pruned, nearest to `kernel`.

    Args:
        kernel, layout: the kernel and its blocks.
        unify, prune: the shares of the blocks that count to unify and to prune.
        kept: per block, its weights that stay after `strip` (None: all of them). A
            block with none does not count and stays free (its weights go with the
            channels another technique removes).

    Returns:
        (the projected kernel, each block's kind: FREE, UNIFIED or PRUNED).
    """
    blocks = layout.blocks(kernel)
    squares, unify_error, same = _costs_of_kinds(blocks, layout.valid)
    weights = tf.reduce_sum(layout.valid, 1) if kept is None else tf.constant(kept, tf.float32)
    count = layout.count if kept is None else int(np.sum(kept > 0))
    pruned = round(prune * count)
    unified = min(round(unify * count), count - pruned)
    squares = tf.where(weights > 0, squares, np.inf)
    # A block of one weight gains nothing by unifying: a magnitude and a sign against 32 bits.
    unify_error = tf.where(weights >= 2, unify_error, np.inf)
    kinds = tf.zeros((layout.count,), tf.int32)
    if pruned:
        chosen = tf.math.top_k(-squares, pruned).indices
        kinds = tf.tensor_scatter_nd_update(kinds, chosen[:, None], tf.fill((pruned,), PRUNED))
    if unified:
        free_error = tf.where(kinds == PRUNED, np.inf, unify_error)
        chosen = tf.math.top_k(-free_error, unified).indices
        kinds = tf.tensor_scatter_nd_update(kinds, chosen[:, None], tf.fill((unified,), UNIFIED))
    return layout.kernel(_by_kind(kinds, blocks, same)), kinds


def _costs_of_kinds(blocks: tf.Tensor, valid: tf.Tensor) -> tuple:
    """Per block: the squared error of pruning it (sum w^2), that of unifying it
    (sum w^2 - n mean|w|^2), and its nearest unified form, sign(w) * mean|w|."""
    weights = tf.reduce_sum(valid, 1)
    squares = tf.reduce_sum(tf.square(blocks), 1)
    magnitude = tf.reduce_sum(tf.abs(blocks), 1) / weights
    unify_error = squares - weights * tf.square(magnitude)
    return squares, unify_error, signs(blocks) * magnitude[:, None] * valid


def unified_kernel(
    kernel: tf.Tensor,
    layout: BlockLayout,
    kinds: tf.Tensor,
    kernel_signs: tf.Tensor,
    magnitude_bits: int = FLOAT_MAGNITUDES,
) -> tf.Tensor:
    """The kernel computed with frozen block kinds and signs: a unified block's weights
    are its signs times one magnitude, mean(sign * w) over the block on the kernel's
    grid of `magnitude_bits` (`blocks.quantized`); pruned ones 0."""
    blocks, valid = layout.blocks(kernel), layout.valid
    block_signs = layout.blocks(kernel_signs)
    magnitude = tf.reduce_sum(blocks * block_signs, 1) / tf.reduce_sum(valid, 1)
    magnitude = quantized(magnitude, magnitude_bits, kinds == UNIFIED)
    return layout.kernel(_by_kind(kinds, blocks, block_signs * magnitude[:, None] * valid))


def _by_kind(kinds: tf.Tensor, free: tf.Tensor, same: tf.Tensor) -> tf.Tensor:
    """Per block: `free` as it is, `same` where unified, zero where pruned."""
    kind = kinds[:, None]
    return tf.where(kind == PRUNED, 0.0, tf.where(kind == UNIFIED, same, free))


@keras.utils.register_keras_serializable(package="tfhybrid")
class UnifyWrapper(L.Wrapper):
    """A Dense, Conv2D or DepthwiseConv2D whose kernel is trained by ADMM toward unified
    and pruned blocks.

    During the search the layer computes with its kernel W as it is (the penalty pulls
    it toward Z); once decided, with `unified_kernel` of W and the frozen kinds and
    signs. Z and U, the kinds and the signs are non-trainable weights, saved with it.

    Args:
        layer: the Dense, Conv2D or DepthwiseConv2D layer.
        block: (rows, cols) or "kernel" (see the module).
        unify: share of the kernel's blocks unified.
        prune: share of its blocks pruned.
        rho: schedule config of the ADMM penalty's weight (see `schedules`).
        update_every: steps between two Z/U updates.
        magnitude_bits: bits of a unified block's magnitude (32: float32).
    """

    def __init__(
        self,
        layer,
        block,
        unify,
        prune,
        rho,
        update_every=1,
        magnitude_bits=FLOAT_MAGNITUDES,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        self.block = block if block == "kernel" else tuple(int(b) for b in block)
        self.unify, self.prune = float(unify), float(prune)
        self.rho = schedules.deserialize(rho)
        self.update_every = int(update_every)
        self.magnitude_bits = int(magnitude_bits)

    def build(self, input_shape):
        if not self.layer.built:
            with tf.name_scope(self.layer.name):  # its own names, for the optimizer's slots
                self.layer.build(input_shape)
        shape = tuple(self.kernel.shape)
        self.layout = BlockLayout(blocked_shape(self.layer), self.block)
        self.z = self.add_weight("z", shape=shape, initializer="zeros", trainable=False)
        self.u = self.add_weight("u", shape=shape, initializer="zeros", trainable=False)
        self.signs = self.add_weight(
            "signs", shape=self.layout.shape, initializer="ones", trainable=False
        )
        self.kinds = self.add_weight(
            "kinds",
            shape=(self.layout.count,),
            dtype=tf.int32,
            initializer="zeros",
            trainable=False,
        )
        *_, inputs, outputs = self.layout.shape
        for name, size in (("row_order", inputs), ("col_order", outputs)):
            order = self.add_weight(
                name,
                shape=(size,),
                dtype=tf.int32,
                initializer=keras.initializers.Constant(np.arange(size)),
                trainable=False,
            )
            setattr(self, name, order)
        self.kept = self.add_weight(
            "kept",
            shape=(2,),
            dtype=tf.int32,
            initializer=keras.initializers.Constant([inputs, outputs]),
            trainable=False,
        )
        base.add_search_state(self)
        super().build(input_shape)

    @property
    def kernel(self) -> tf.Variable:
        """The layer's kernel (a DepthwiseConv2D's depthwise kernel)."""
        return kernel_of(self.layer)

    def ordered(self, kernel: tf.Tensor) -> tf.Tensor:
        """`kernel` in the blocks' shape (`blocks.blocked_shape`), its input and output
        channels in the blocks' order: the ones that stay first (see `decide`), so blocks
        align with the stripped kernel's."""
        kernel = tf.reshape(kernel, self.layout.shape)
        return tf.gather(tf.gather(kernel, self.row_order, axis=-2), self.col_order, axis=-1)

    def unordered(self, kernel: tf.Tensor) -> tf.Tensor:
        """The inverse of `ordered`."""
        rows = tf.math.invert_permutation(self.row_order)
        cols = tf.math.invert_permutation(self.col_order)
        kernel = tf.gather(tf.gather(kernel, rows, axis=-2), cols, axis=-1)
        return tf.reshape(kernel, self.kernel.shape)

    def effective_kernel(self) -> tf.Tensor:
        """The kernel the layer computes with (see the class)."""
        kernel = self.kernel
        unified = unified_kernel(
            self.ordered(kernel), self.layout, self.kinds, self.signs, self.magnitude_bits
        )
        return tf.where(self.decided > 0, self.unordered(unified), kernel)

    def kept_weights(self) -> np.ndarray:
        """Per block, its weights in the channels that stay (in the blocks' order)."""
        rows, cols = self.kept.numpy()
        *_, inputs, outputs = self.layout.shape
        mask = (np.arange(inputs)[:, None] < rows) & (np.arange(outputs)[None, :] < cols)
        kept = np.broadcast_to(mask, self.layout.shape).astype(np.float32)
        return self.layout.blocks(kept).numpy().sum(1)

    def call(self, inputs, training=None):  # noqa: ARG002 - Keras passes training
        return call_with_kernel(self.layer, inputs, self.effective_kernel())

    def projected(self, kernel: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(`kernel` (the weights by default) projected onto the constraint, its kinds)."""
        kernel = self.kernel if kernel is None else kernel
        projected, kinds = project(
            tf.reshape(kernel, self.layout.shape), self.layout, self.unify, self.prune
        )
        return tf.reshape(projected, kernel.shape), kinds

    def penalty(self) -> tf.Tensor:
        """The ADMM penalty at the current step; zero once decided."""
        rho = tf.where(self.decided > 0, 0.0, self.rho(self.step))
        return constraints.admm_penalty(self.kernel, self.z, self.u, rho)

    def admm_step(self) -> tf.Tensor:
        """A Z/U update (see `constraints.admm_update`)."""
        constraints.admm_update(self.kernel, self.z, self.u, lambda t: self.projected(t)[0])
        return tf.constant(True)

    def decide(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> None:
        """Projects the weights onto the constraint and freezes the kinds and signs.

        Args:
            rows, cols: the input and output channels that stay after `strip` (None:
                all). They come first in the blocks' order, so the stripped kernel's
                blocks are these blocks, and only blocks holding some of them count.
        """
        if isinstance(self.layer, L.DepthwiseConv2D):
            rows = None  # one row of blocks over the output channels (`blocked_shape`)
        *_, inputs, outputs = self.layout.shape
        orders = [_kept_first(rows, inputs), _kept_first(cols, outputs)]
        self.row_order.assign(orders[0])
        self.col_order.assign(orders[1])
        self.kept.assign(
            [inputs if rows is None else len(rows), outputs if cols is None else len(cols)]
        )
        kernel, kinds = project(
            self.ordered(self.kernel),
            self.layout,
            self.unify,
            self.prune,
            self.kept_weights(),
        )
        self.kernel.assign(self.unordered(kernel))
        self.kinds.assign(kinds)
        self.signs.assign(signs(kernel))

    def compress_more(self, count: int) -> bool:
        """Unifies up to `count` more free blocks, those that cost least to unify; with
        none free, prunes the unified blocks that cost least to prune (the least sum of
        squares). Only blocks that hold channels that stay count. False if every such
        block is pruned already."""
        kinds = self.kinds.numpy()
        blocks = self.layout.blocks(self.ordered(self.kernel))
        squares, unify_error, same = _costs_of_kinds(blocks, self.layout.valid)
        kept = self.kept_weights()
        free = np.flatnonzero((kinds == FREE) & (kept >= 2))  # see `project`
        unified = np.flatnonzero((kinds == UNIFIED) & (kept > 0))
        if free.size:
            chosen = free[np.argsort(unify_error.numpy()[free], kind="stable")[:count]]
            kinds[chosen] = UNIFIED
        elif unified.size:
            chosen = unified[np.argsort(squares.numpy()[unified], kind="stable")[:count]]
            kinds[chosen] = PRUNED
        else:
            return False
        kernel = self.layout.kernel(_by_kind(tf.constant(kinds), blocks, same))
        self.kernel.assign(self.unordered(kernel))
        self.kinds.assign(kinds)
        self.signs.assign(signs(kernel))
        return True

    def measured(self) -> BlockShares:
        """The shares of the blocks' kinds, counting only the channels that stay."""
        kinds, kept = self.kinds.numpy(), self.kept_weights()
        return BlockShares.measured(self.layout, kinds, kept, self.magnitude_bits)

    def shares(self) -> BlockShares:
        """The kernel's blocks as the cost model counts them: planned during the search,
        measured from the kinds once decided (eagerly; a training step's logged ratios
        keep the planned ones, which differ only by the short blocks at the edges)."""
        if tf.executing_eagerly() and bool(self.decided.numpy()):
            return self.measured()
        return BlockShares.planned(self.layout, self.unify, self.prune, self.magnitude_bits)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "block": self.block if self.block == "kernel" else list(self.block),
            "unify": self.unify,
            "prune": self.prune,
            "rho": schedules.serialize(self.rho),
            "update_every": self.update_every,
            "magnitude_bits": self.magnitude_bits,
        }

    def compression_note(self) -> str:
        return f"{self.unify:.0%} of blocks {self.block} unified, {self.prune:.0%} pruned"


@base.register_technique
class Unify(base.Technique):
    """Micro-structured weight unification and pruning by ADMM (see the module).

    Args:
        block: (rows, cols) of a block over a kernel's input and output channels, or
            "kernel" for a k x k slice.
        unify: share of every kernel's blocks unified; None: the share that meets the
            budget's `bits` with the other layers whole.
        prune: share of every kernel's blocks pruned; None: the share that meets the
            budget's `bits`. Both None: the fewest blocks unified that meet it, and
            where unifying every block is not enough, the fewest of them pruned.
        rho: (start, end) of the ADMM penalty's weight, rising geometrically over the
            search.
        update_every: steps between Z/U updates; None: a twentieth of the search.
        magnitude_bits: bits of each unified block's magnitude, a multiple of one float32
            step per kernel (1 to 16), or 32 for float32 magnitudes.
        layers: only these layers (besides `hybrid_compress`'s own `layers`/`skip`).
        skip: never these layers.

    Raises:
        ValueError: for a bad block, shares outside [0, 1] or above 1 together, or a
            rho that is not two positive numbers, or magnitude bits not in 1..16 or 32.
    """

    name = "unify"

    def __init__(
        self,
        block: tuple | str = (1, 4),
        unify: float | None = 0.5,
        prune: float | None = 0.0,
        rho: tuple = DEFAULT_RHO,
        update_every: int | None = None,
        magnitude_bits: int = DEFAULT_MAGNITUDE_BITS,
        layers: list | None = None,
        skip: list | tuple = (),
        derived: list | None = None,
    ):
        self.block = _checked_block(block)
        for option, share in (("unify", unify), ("prune", prune)):
            if share is not None and not 0 <= share <= 1:
                raise ValueError(f"Unify({option}={share!r}): give a share of blocks in [0, 1].")
        if unify is not None and prune is not None and unify + prune > 1:
            raise ValueError(
                f"Unify(unify={unify}, prune={prune}): a block is unified or pruned, not "
                "both, so the shares add up to at most 1."
            )
        if len(rho) != 2 or min(rho) <= 0:
            raise ValueError(f"Unify(rho={rho!r}): give (start, end), both > 0.")
        if magnitude_bits not in (*range(1, 17), FLOAT_MAGNITUDES):
            raise ValueError(
                f"Unify(magnitude_bits={magnitude_bits!r}): give 1 to 16 bits per magnitude "
                "(on a step per kernel), or 32 for float32 magnitudes."
            )
        self.magnitude_bits = int(magnitude_bits)
        self.unify = None if unify is None else float(unify)
        self.prune = None if prune is None else float(prune)
        self.rho = tuple(float(r) for r in rho)
        self.update_every = None if update_every is None else int(update_every)
        self.layers, self.skip = list(layers or []), list(skip)
        # The shares derived from the budget (saved, so the search's end derives them again).
        given = {"unify": unify, "prune": prune}
        self.derived = list(derived or [k for k, v in given.items() if v is None])

    def get_config(self) -> dict:
        return {
            "block": self.block if self.block == "kernel" else list(self.block),
            "unify": self.unify,
            "prune": self.prune,
            "rho": list(self.rho),
            "update_every": self.update_every,
            "magnitude_bits": self.magnitude_bits,
            "layers": self.layers,
            "skip": self.skip,
            "derived": self.derived,
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        only, skip = setup.restricted("Unify", self.layers, self.skip)
        taken, why_not = [], []
        for layer in setup.analysis.model.layers:
            if not any(w.shape.rank >= 2 for w in layer.weights):
                continue  # no kernel: biases, normalisation, pooling
            if layer.name in skip or (only and layer.name not in only):
                why_not.append(f"{layer.name}: left out by `layers=`/`skip=`")
            elif reason := _why_not_unified(layer, self.block):
                why_not.append(f"{layer.name}: {reason}")
            else:
                taken.append(layer.name)
        if not taken:
            raise ValueError("Unify finds no layer to take. Per layer:\n  " + "\n  ".join(why_not))
        unsupported = [line for line in why_not if "left out by" not in line]
        if unsupported:
            warnings.warn(
                "Unify leaves these layers whole:\n  " + "\n  ".join(unsupported), stacklevel=4
            )
        self._taken = taken
        return dict.fromkeys(taken, "weights")

    def prepare(self, setup: base.Setup, others: list[base.Technique]) -> None:
        """Derives the shares left None from the bits budget."""
        if self.unify is None or self.prune is None:
            self.unify, self.prune = _shares_for_budget(setup, self._taken, self)

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if op.layer.name not in self._taken:
            return None
        rho = schedules.ExponentialDecay(*self.rho, 1)  # set_search_steps stretches it
        wrapper = UnifyWrapper(
            graph.clone_layer(op.layer),
            self.block,
            self.unify,
            self.prune,
            schedules.serialize(rho),
            magnitude_bits=self.magnitude_bits,
            name=f"unify_{op.layer.name}",
        )
        return with_inner_weights(wrapper, op.layer.get_weights())

    def initialize(self, model: Any, original: Any) -> None:
        """Z starts at the projection of the weights, U at zero."""
        for wrapper in self.layers_of(model):
            wrapper.z.assign(wrapper.projected()[0])

    # -- training ----------------------------------------------------------------------
    def layers_of(self, model: Any) -> list:
        return [layer for layer in model.layers if isinstance(layer, UnifyWrapper)]

    def set_search_steps(self, model: Any, steps: int) -> None:
        """rho rises over the search; Z/U update every `update_every` steps."""
        every = self.update_every or max(1, steps // 20)
        for wrapper in self.layers_of(model):
            wrapper.rho = schedules.ExponentialDecay(*self.rho, steps)
            wrapper.update_every = every

    def loss(self, model: Any) -> tf.Tensor | None:
        return tf.add_n([w.penalty() for w in self.layers_of(model)])

    def after_step(self, model: Any) -> None:
        for wrapper in self.layers_of(model):
            due = tf.logical_and(wrapper.decided == 0, wrapper.step % wrapper.update_every == 0)
            tf.cond(due, wrapper.admm_step, lambda: tf.constant(False))

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """The planned shares of blocks; once decided, the blocks' kinds as they are."""
        shares = {w.layer.name: w.shares() for w in self.layers_of(model)}
        return base.Decisions(blocks=shares)

    def finish(self, model: Any) -> None:
        """Projects every kernel, then compresses more blocks while the kernels store
        more bits than the budget allows: the planned shares count blocks of average
        size, and the projection may prune the short ones at the edges first."""
        wrappers = self.layers_of(model)
        self._derive_again(model, wrappers)
        kept = base.kept_kernel_channels(model)
        for wrapper in wrappers:
            wrapper.decide(*kept[wrapper.layer.name])
        target = model.budget.targets().get("bits")
        while target is not None and _measured_bits(model, wrappers) > target:
            widest = max(wrappers, key=_free_then_unified)
            if not widest.compress_more(max(1, widest.layout.count // 200)):
                break  # every block pruned: the budget was out of Unify's reach

    def _derive_again(self, model: Any, wrappers: list) -> None:
        """Sets the shares derived from the bits budget again, with the other techniques'
        hard decisions (DF's channels): the room they leave."""
        target = model.budget.targets().get("bits")
        if not self.derived or target is None:
            return
        hard = model.decisions(hard=True)
        fixed = {k: None if k in self.derived else getattr(self, k) for k in ("unify", "prune")}

        def bits(shares: tuple[float, float]) -> float:
            planned = {
                w.layer.name: BlockShares.planned(w.layout, *shares, self.magnitude_bits)
                for w in wrappers
            }
            decided = dataclasses.replace(hard, blocks={**hard.blocks, **planned})
            return float(model.ratios_of(decided)["bits"])

        (self.unify, self.prune), _ = _solved_shares(fixed["unify"], fixed["prune"], bits, target)
        for wrapper in wrappers:
            wrapper.unify, wrapper.prune = self.unify, self.prune

    def plan(self, model: Any) -> plan.Plan:
        """Each wrapper becomes its layer with the kernel it computes with once decided
        (mid-search: the weights projected now)."""
        replace = {}
        for wrapper in self.layers_of(model):
            decided = bool(wrapper.decided.numpy())
            kernel = wrapper.effective_kernel() if decided else wrapper.projected()[0]
            weights = [kernel.numpy(), *(w.numpy() for w in wrapper.layer.weights[1:])]
            replace[wrapper.name] = plan.PlainLayer.of(wrapper.layer, weights)
        return plan.Plan.of(self.name, replace=replace)

    def scalars(self, model: Any) -> dict[str, float]:
        """How far each kernel is from its constrained copy: ||W - Z|| / ||W||."""
        figures = {}
        for wrapper in self.layers_of(model):
            distance = constraints.relative_distance(wrapper.kernel, wrapper.z)
            figures[f"unify/distance/{wrapper.layer.name}"] = distance
        return figures


def _kept_first(kept: np.ndarray | None, size: int) -> np.ndarray:
    """An order of `size` channels: the `kept` ones (all: None) first, in order."""
    if kept is None:
        return np.arange(size, dtype=np.int32)
    removed = np.setdiff1d(np.arange(size), kept)
    return np.concatenate([kept, removed]).astype(np.int32)


def _free_then_unified(wrapper: UnifyWrapper) -> tuple[int, int]:
    """(free blocks, unified blocks): the kernel that can give most bits first."""
    kinds, kept = wrapper.kinds.numpy(), wrapper.kept_weights()
    return int(np.sum((kinds == FREE) & (kept >= 2))), int(np.sum((kinds == UNIFIED) & (kept > 0)))


def _measured_bits(model: Any, wrappers: list) -> float:
    """The model's bits ratio with the wrappers' kernels counted by their blocks' kinds."""
    decisions = model.decisions(hard=True)
    measured = {w.layer.name: w.measured() for w in wrappers}
    decisions = dataclasses.replace(decisions, blocks={**decisions.blocks, **measured})
    return float(model.ratios_of(decisions)["bits"])


def _checked_block(block: Any) -> tuple | str:
    """`block` as (rows, cols) or "kernel".

    Raises:
        ValueError: for anything else.
    """
    if block == "kernel":
        return block
    try:
        rows, cols = (int(b) for b in block)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows < 1 or cols < 1 or rows * cols < 2:
        raise ValueError(
            f"Unify(block={block!r}): give (rows, cols) of at least two weights, e.g. "
            "(1, 4) or (2, 2), or 'kernel' for a k x k slice."
        )
    return rows, cols


def _why_not_unified(layer: Any, block: tuple | str) -> str | None:
    """Why Unify cannot take `layer`, or None if it can."""
    if type(layer) not in BLOCKED_LAYERS or is_grouped(layer):
        kind = type(layer).__name__ + (" (grouped)" if is_grouped(layer) else "")
        return f"Unify takes Dense, Conv2D and DepthwiseConv2D kernels, not a {kind}'s"
    if not in_blocks(layer, block):
        return "block='kernel' needs a kernel with k x k positions, not a Dense one"
    return None


def _shares_for_budget(
    setup: base.Setup, taken: list[str], technique: Unify
) -> tuple[float, float]:
    """`technique`'s (unify, prune), the shares left None the ones that meet the bits
    budget with the other layers whole (see `_solved_shares`).

    Raises:
        ValueError: without a bits budget, or when the shares cannot meet it.
    """
    block, unify, prune = technique.block, technique.unify, technique.prune
    target = setup.budget.targets().get("bits")
    if target is None:
        raise ValueError(
            f"Unify(unify={unify}, prune={prune}) derives the shares left None from a bits "
            f"budget, and {setup.budget} has none. Give both shares, e.g. "
            "Unify(unify=0.5, prune=0.0), or Budget(bits=...)."
        )
    model = setup.analysis.model
    layouts = {n: BlockLayout(blocked_shape(model.get_layer(n)), block) for n in taken}

    def bits(shares: tuple[float, float]) -> float:
        planned = {
            n: BlockShares.planned(layouts[n], *shares, technique.magnitude_bits) for n in taken
        }
        return setup.cost_model.costs(blocks=planned)["bits"] / setup.original["bits"]

    shares, within = _solved_shares(unify, prune, bits, target)
    if not within:
        most = "unified" if prune is not None else "pruned"
        raise ValueError(
            f"{setup.budget} cannot be met by Unify(block={block}) alone: with every block "
            f"that may be {most} so, the model keeps {bits(shares):.4f} of its float32 "
            "storage. Raise the budget, use larger blocks, prune more, or stack a technique "
            "that removes channels."
        )
    return shares


def _solved_shares(
    unify: float | None, prune: float | None, bits: Any, target: float
) -> tuple[tuple[float, float], bool]:
    """The least compressing (unify, prune), the shares left None varied, whose `bits` meet
    `target`, and whether any does (if not: the most compressing ones). Both None: blocks
    are unified first, then the unified ones pruned."""

    def shares(x: float) -> tuple[float, float]:  # bits fall as x rises from 0 to 1
        if unify is None and prune is None:  # unified first, then pruned
            return (2 * x, 0.0) if x <= 0.5 else (2 - 2 * x, 2 * x - 1)
        if unify is None:
            return x * (1.0 - prune), prune
        return unify, x * (1.0 - unify)

    if bits(shares(1.0)) > target:
        return shares(1.0), False
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if bits(shares(middle)) <= target else (middle, high)
    return tuple(float(share) for share in shares(high)), True
