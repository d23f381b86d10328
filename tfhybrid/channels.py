"""Channel dependency analysis: which channels of a Keras graph must shrink together.

Every tensor's channel axis (the last one) is described by a *layout*: a tuple of
segments `(group, mult)`, read left to right. A segment stands for the channels of
one channel group, each repeated `mult` times in a row (a depthwise multiplier).
A Flatten repeats its input's layout once per spatial position; a Concatenate
joins layouts; an Add unifies the groups of its inputs. Producers (Conv, Dense)
start a fresh group. Anything the analysis cannot see through makes the groups it
touches non-prunable, with the layer named in the reason: never guessed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import graph
from tfhybrid._keras import (
    CONV,
    DEPTHWISE_CONV,
    MERGE,
    PASS_THROUGH,
    SEPARABLE_CONV,
    TRANSPOSED_CONV,
    KerasTensor,
    LayerScale,
    SlicingOpLambda,
    TFOpLambda,
    is_grouped,
    keras,
)

L = keras.layers

_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")

#: TF ops (a `TFOpLambda`'s symbol) that act on each element alone: they pass every
#: channel through, coupling the channels of tensor operands of the output's width.
ELEMENTWISE_OPS = frozenset(
    f"{module}.{name}"
    for module, names in {
        "math": "abs add ceil cos divide divide_no_nan elu erf exp expm1 floor log log1p "
        "maximum minimum multiply multiply_no_nan negative pow reciprocal round rsqrt "
        "sigmoid sign sin softplus softsign sqrt square squared_difference subtract tanh "
        "truediv",
        "nn": "bias_add elu gelu leaky_relu relu relu6 selu sigmoid silu softplus softsign "
        "swish tanh",
        "__operators__": "add",
    }.items()
    for name in names.split()
) | {"clip_by_value", "identity", "cast"}
#: TF ops that reduce over axes: they pass the channels through unless they reduce them.
REDUCTION_OPS = frozenset(f"math.reduce_{n}" for n in "mean max min sum prod".split())

Layout = tuple  # tuple of (group, mult) segments


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How a layer class handles channels: see `register_layer`."""

    role: str
    slice_weights: Callable | None = None
    channels_config: str | None = None


ROLES = ("passes", "produces")
_RULES: dict[type, LayerRule] = {}


def register_layer(
    layer_class: type,
    role: str = "passes",
    *,
    slice_weights: Callable | None = None,
    channels_config: str | None = None,
) -> None:
    """Declares how layers of `layer_class` (and its subclasses) handle channels.

    Layers tfhybrid does not know are kept whole, with the channel groups around them.
    Declared, they take part in channel groups like the built-in ones.

    Args:
        layer_class: a Keras layer class of yours.
        role: "passes": output channel i is computed from input channel i alone (a
            per-channel scale, an activation); the channels before and after are one
            group. "produces": the layer reads its input channels and writes new ones
            (like Dense); it ends the input's group and starts a new one.
        slice_weights: `f(layer, kept_in, kept_out) -> (config_overrides, weights)`:
            the config changes and the weights (in `get_weights()` order) of the layer
            with only the channels `kept_in` of its input and `kept_out` of its output
            (index arrays, or None when that side keeps all its channels). Required for
            "produces". For "passes" the default slices, along the last axis, every
            weight whose last axis has the layer's channel count.
        channels_config: for "passes" with the default slicing: the config entry that
            holds the channel count (e.g. "units"), set to the kept count.

    Raises:
        ValueError: for an unknown role, or "produces" without `slice_weights`.
        TypeError: for a class that is not a Keras layer.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, L.Layer)):
        raise TypeError(f"register_layer takes a Keras layer class, got {layer_class!r}.")
    if role not in ROLES:
        raise ValueError(
            f"register_layer({layer_class.__name__}): role={role!r} is not one of {ROLES}."
        )
    if role == "produces" and slice_weights is None:
        raise ValueError(
            f"register_layer({layer_class.__name__}, role='produces') needs slice_weights: "
            "how to cut its weights to the kept input and output channels."
        )
    _RULES[layer_class] = LayerRule(role, slice_weights, channels_config)


#: ConvNeXt's per-channel scale, declared as a user would declare theirs.
register_layer(LayerScale, "passes", channels_config="projection_dim")


def registered_rule(layer: Any) -> LayerRule | None:
    """The rule declared for `layer`'s class (or its nearest registered base class)."""
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


@dataclasses.dataclass(frozen=True)
class Member:
    """A layer's part in a channel group.

    Attributes:
        layer: layer name.
        role: "produces" (creates the channels), "passes" (carries them through,
            its weights sliced if it has any), "consumes" (reads them on its
            input axis, e.g. the input channels of a Conv kernel) or "heads" (an
            attention layer's heads: the group is its heads, not channels of a tensor).
        offset: where the group's first channel sits on the layer's channel axis
            (non-zero after a Concatenate).
        mult: channels per group channel on that axis (a depthwise multiplier).
        repeats: how often the group recurs along the axis (a Flatten's positions).
    """

    layer: str
    role: str
    offset: int = 0
    mult: int = 1
    repeats: int = 1


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be removed together, in every tensor that carries them.

    Attributes:
        id: index of the group in `channel_groups(model)`.
        size: number of channels.
        prunable: whether channels may be removed.
        reason: why not, when not prunable.
        members: the layers that produce, pass through or consume these channels.
    """

    id: int
    size: int
    prunable: bool
    reason: str | None
    members: list[Member]

    def layers(self, role: str | None = None) -> list[str]:
        """Names of member layers, optionally only those with `role`."""
        return list(dict.fromkeys(m.layer for m in self.members if role in (None, m.role)))

    def key(self) -> tuple[str, ...]:
        """A name of the group that survives rebuilding the model: its producers' names,
        sorted ("<layer>/heads" for an attention layer's heads)."""
        heads = self.layers("heads")
        return tuple(f"{name}/heads" for name in heads) or tuple(sorted(self.layers("produces")))

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"kept whole: {self.reason}"
        return f"ChannelGroup(id={self.id}, size={self.size}, {state}, layers={self.layers()})"


@dataclasses.dataclass
class ChannelAnalysis:
    """The result of `analyze`: groups plus the layout of every tensor.

    Attributes:
        model: the analysed model (nested models inlined); its tensors are the keys.
        groups: the channel groups, in a stable order.
        layouts: id of each Keras tensor -> its layout as ((group id, mult), ...).
        unsupported: names of layers the analysis could not see through.
        nested: per nested model of the original, the names of its layers in `model`.
    """

    model: Any
    groups: list[ChannelGroup]
    layouts: dict
    unsupported: list[str]
    nested: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def layout(self, tensor: Any) -> Layout:
        """The layout of one of `model`'s Keras tensors."""
        return self.layouts[id(tensor)]

    def heads_group(self, layer_name: str) -> ChannelGroup | None:
        """The group of attention layer `layer_name`'s heads (None for other layers)."""
        for group in self.groups:
            if any(m.role == "heads" and m.layer == layer_name for m in group.members):
                return group
        return None

    def indices(self, tensor: Any, keep: dict) -> np.ndarray | None:
        """Channel indices of `tensor` that survive when groups keep `keep[gid]`.

        Returns None when the tensor keeps all its channels.
        """
        return channel_indices(self.layout(tensor), keep, [g.size for g in self.groups])


def channel_indices(layout: Layout, keep: dict, sizes: list[int]) -> np.ndarray | None:
    """Positions on a tensor's channel axis that survive a removal.

    Args:
        layout: the tensor's ((group id, mult), ...) layout.
        keep: group id -> sorted array of the group channels kept; groups not
            listed keep all their channels.
        sizes: channel count of every group, by id.

    Returns:
        The kept positions in increasing order, or None if nothing is removed.
    """
    if not any(gid in keep for gid, _ in layout):
        return None
    parts, offset = [], 0
    for gid, mult in layout:
        kept = keep.get(gid, np.arange(sizes[gid]))
        parts.append(offset + (np.asarray(kept)[:, None] * mult + np.arange(mult)).ravel())
        offset += sizes[gid] * mult
    return np.concatenate(parts).astype(np.int64)


def channel_groups(model: Any) -> list[ChannelGroup]:
    """The channel groups of a functional or Sequential model.

    Args:
        model: a functional or built Sequential tf_keras model (not modified).

    Returns:
        The groups in a stable order; `group.id` is its index.

    Raises:
        TypeError: for a subclassed model.
    """
    return analyze(model).groups


#: How the warning about layers the analysis cannot see through begins.
OPAQUE_WARNING = "tfhybrid keeps the channels around these layers whole"


def analyze(model: Any) -> ChannelAnalysis:
    """Channel groups and tensor layouts of `model` (nested models inlined).

    Layers the analysis cannot see through are reported in one warning.
    """
    flat, nested = graph.flatten_with_origins(model)
    analysis = _Analyzer().run(flat)
    analysis.nested = nested
    if analysis.unsupported:
        warnings.warn(
            f"{OPAQUE_WARNING}, since it cannot see through them: "
            f"{', '.join(analysis.unsupported)}",
            stacklevel=3,
        )
    return analysis


class _UnionFind:
    """Channel groups under construction: sizes, merges and reasons to keep whole."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.reasons: dict[int, str] = {}

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if reason:
            self.block(len(self.parent) - 1, reason)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        if drop in self.reasons:
            self.reasons.setdefault(keep, self.reasons.pop(drop))

    def block(self, g: int, reason: str) -> None:
        self.reasons.setdefault(self.find(g), reason)


class _Analyzer:
    """Walks a flat functional model once and builds its channel groups."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.layouts: dict[int, Layout] = {}
        self.members: list[tuple[int, Member]] = []
        self.first_inputs: dict[int, list[Layout]] = {}
        self.produced: dict[int, int] = {}
        self.heads: dict[int, int] = {}
        self.unsupported: list[str] = []
        self.retired: set[int] = set()  # groups replaced by groups of their blocks

    def run(self, model: Any) -> ChannelAnalysis:
        for kt, name in zip(model.inputs, model.input_names):
            self.layouts[id(kt)] = self._fresh(kt, f"it touches the model input '{name}'")
        for op in graph.ops(model):
            self._visit(op)
        for kt, name in zip(model.outputs, model.output_names):
            self._block(self.layouts[id(kt)], f"it feeds the model output '{name}'")
        return self._result(model)

    # -- helpers -----------------------------------------------------------------
    def _fresh(self, kt: Any, reason: str | None = None) -> Layout:
        channels = kt.shape[-1] if kt.shape.rank else 1
        if channels is None:
            return ((self.uf.new(1, reason or "its channel count is unknown"), 1),)
        return ((self.uf.new(int(channels), reason), 1),)

    def _block(self, layout: Layout, reason: str) -> None:
        for g, _ in layout:
            self.uf.block(g, reason)

    def _seg_size(self, seg: tuple) -> int:
        return self.uf.size[self.uf.find(seg[0])] * seg[1]

    def _record(self, layout: Layout, layer: Any, role: str) -> None:
        offset, seen = 0, {}
        for g, mult in layout:
            if g in seen:
                seen[g] = dataclasses.replace(seen[g], repeats=seen[g].repeats + 1)
            else:
                seen[g] = Member(layer.name, role, offset, mult)
            offset += self._seg_size((g, mult))
        self.members.extend(seen.items())

    def _unify(self, a: Layout, b: Layout, layer: Any) -> None:
        same_shape = len(a) == len(b) and all(
            sa[1] == sb[1] and self._seg_size(sa) == self._seg_size(sb) for sa, sb in zip(a, b)
        )
        if same_shape:
            for (ga, _), (gb, _) in zip(a, b):
                self.uf.union(ga, gb)
            return
        if self._unify_in_blocks(a, b) or self._unify_in_blocks(b, a):
            return
        reason = (
            f"'{layer.name}' ({type(layer).__name__}) joins tensors whose channels are "
            "laid out differently"
        )
        self._block(a, reason)
        self._block(b, reason)

    def _unify_in_blocks(self, coarse: Layout, fine: Layout) -> bool:
        """Couples a tensor of whole blocks (a grouped conv's groups) with a tensor of
        single channels of the same width (RegNetY's squeeze-excite gate), by making
        the latter's group one of blocks too. False where that does not apply."""
        if len(coarse) != 1 or len(fine) != 1:
            return False
        (gc, width), (gf, mult) = coarse[0], fine[0]
        fine_root = self.uf.find(gf)
        if mult != 1 or width <= 1 or fine_root in self.uf.reasons:
            return False
        if self._seg_size(coarse[0]) != self._seg_size(fine[0]):
            return False
        self.uf.union(gc, self._coarsen(fine_root, width))
        return True

    # -- the rules ---------------------------------------------------------------
    def _visit(self, op: graph.Op) -> None:
        layer = op.layer
        ins = [self.layouts[id(kt)] for kt in op.inputs]
        if layer.weights and id(layer) in self.first_inputs:
            for first, now in zip(self.first_inputs[id(layer)], ins):
                self._unify(first, now, layer)
        self.first_inputs.setdefault(id(layer), ins)
        outs = self._rule(op, ins)
        for kt, layout in zip(op.outputs, outs, strict=True):
            self.layouts[id(kt)] = layout

    def _rule(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        layer = op.layer
        rule = registered_rule(layer)
        if rule is not None:
            return self._registered(op, ins, rule)
        if not _channels_last(layer):
            return self._opaque(op, ins, "it is not channels-last")
        if isinstance(layer, DEPTHWISE_CONV):
            return self._depthwise(op, ins[0], layer.depth_multiplier)
        if is_grouped(layer):
            return self._grouped(op, ins[0])
        if isinstance(layer, TFOpLambda) and not isinstance(layer, SlicingOpLambda):
            return self._tf_op(op, ins)
        if isinstance(layer, (*SEPARABLE_CONV, *TRANSPOSED_CONV, *CONV, L.Dense)):
            return self._producer(op, ins[0])
        if isinstance(layer, L.MultiHeadAttention):
            return self._attention(op, ins)
        if isinstance(layer, (L.BatchNormalization, L.LayerNormalization)):
            return self._normalization(op, ins[0])
        if isinstance(layer, (L.Normalization, L.Rescaling)):
            return self._preprocessing(op, ins[0])
        if isinstance(layer, MERGE):
            return self._merge(op, ins)
        if isinstance(layer, L.Concatenate):
            return self._concatenate(op, ins)
        if isinstance(layer, L.Flatten):
            return self._flatten(op, ins[0])
        if isinstance(layer, L.Reshape):
            return self._reshape(op, ins[0])
        if isinstance(layer, PASS_THROUGH) and not _mixes_channels(layer):
            return self._pass(op, ins[0])
        if isinstance(layer, TFOpLambda):
            return self._opaque(op, ins, f"the TF op '{layer.symbol}' slices or reshapes")
        if not type(layer).__module__.startswith(("tf_keras.", "keras.")):
            return self._opaque(
                op, ins, "it is a custom layer: declare how it handles channels with "
                "tfhybrid.register_layer"
            )  # fmt: skip
        return self._opaque(op, ins, "tfhybrid cannot see through it")

    def _registered(self, op: graph.Op, ins: list[Layout], rule: LayerRule) -> list[Layout]:
        if rule.role == "produces":
            return self._producer(op, ins[0])
        if op.outputs[0].shape[-1] != op.inputs[0].shape[-1]:
            layer = op.layer
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) is registered as 'passes' "
                f"(tfhybrid.register_layer), but it turns {op.inputs[0].shape[-1]} input "
                f"channels into {op.outputs[0].shape[-1]}: register it as 'produces' with "
                "a slice_weights function."
            )
        return self._pass(op, ins[0])

    def _tf_op(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        """An element-wise TF op couples its full-width tensor operands, like `Add`;
        operands of one channel broadcast and constants are sliced (see surgery)."""
        symbol, channels = op.layer.symbol, op.outputs[0].shape[-1]
        if symbol in REDUCTION_OPS:
            return self._reduction(op, ins)
        if symbol not in ELEMENTWISE_OPS:
            return self._opaque(op, ins, f"the TF op '{symbol}' is not known to be element-wise")
        for constant in constant_operands(op):
            if np.ndim(constant) and np.shape(constant)[-1] not in (1, channels):
                return self._opaque(
                    op, ins, f"'{symbol}' has a constant operand of shape {np.shape(constant)}"
                )
        widths = [kt.shape[-1] for kt in op.inputs]
        if any(w not in (1, channels) for w in widths) or channels not in widths:
            return self._opaque(op, ins, f"'{symbol}' broadcasts across channels")
        return self._merge(op, ins)

    def _reduction(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        args = {**dict(zip(("input_tensor", "axis"), op.call_args)), **op.call_kwargs}
        rank = op.inputs[0].shape.rank
        axes = np.atleast_1d(args.get("axis")) if args.get("axis") is not None else range(rank)
        if rank - 1 in {int(a) % rank for a in axes} or op.outputs[0].shape.rank != rank:
            return self._opaque(op, ins, f"'{op.layer.symbol}' reduces across channels")
        return self._pass(op, ins[0])

    def _pass(self, op: graph.Op, layout: Layout) -> list[Layout]:
        if op.outputs[0].shape[-1] != op.inputs[0].shape[-1]:
            return self._opaque(op, [layout], "it changes the channel axis")
        self._record(layout, op.layer, "passes")
        return [layout]

    def _producer(self, op: graph.Op, layout: Layout) -> list[Layout]:
        layer = op.layer
        self._record(layout, layer, "consumes")
        if id(layer) not in self.produced:
            self.produced[id(layer)] = self._fresh(op.outputs[0])[0][0]
        out = ((self.produced[id(layer)], 1),)
        self._record(out, layer, "produces")
        if _mixes_channels(layer):
            self._block(out, f"'{layer.name}' applies a softmax across its channels")
        return [out]

    def _attention(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        """Self-attention reads its input's channels through the query, key and value
        projections and writes new ones through its output projection, like a Dense;
        its heads are a group of their own (a head goes with its slices of all four)."""
        layer, args = op.layer, attention_arguments(op)
        query = args["query"]
        rank = query.shape.rank
        why = None
        others = [args.get(name) for name in ("value", "key")]
        if any(t is not None and t is not query for t in others):
            why = "it attends from one tensor to another (only self-attention is supported)"
        elif rank - 1 in {a % rank for a in layer.get_config()["attention_axes"] or ()}:
            why = "it attends across the channel axis"
        elif np.ndim(layer.get_config()["output_shape"] or 0) or len(op.outputs) > 1:
            why = "its output is not one channel axis (output_shape, or attention scores)"
        if why:
            return self._opaque(op, ins, f"MultiHeadAttention '{layer.name}': {why}")
        if args.get("attention_mask") is not None:
            mask = self.layouts[id(args["attention_mask"])]
            self._block(mask, f"it is the attention mask of '{layer.name}'")
        if id(layer) not in self.heads:
            self.heads[id(layer)] = self.uf.new(layer.get_config()["num_heads"])
        self._record(((self.heads[id(layer)], 1),), layer, "heads")
        return self._producer(op, self.layouts[id(query)])

    def _grouped(self, op: graph.Op, layout: Layout) -> list[Layout]:
        """A grouped conv: its groups are the units that go, each with all its input
        and output channels. Its input's group becomes a group of those units."""
        layer, width = op.layer, op.inputs[0].shape[-1]
        per_in, per_out = width // layer.groups, layer.filters // layer.groups
        if per_in == 1:  # a depthwise conv written as a grouped one
            return self._depthwise(op, layout, per_out)
        g = self.uf.find(layout[0][0])
        if layout != ((layout[0][0], 1),) or g in self.uf.reasons:
            reason = (
                f"grouped convolution '{layer.name}' (groups={layer.groups}) is kept whole: "
                "its input's channels are kept whole or laid out in several parts"
            )
            self._block(layout, reason)
            return [self._fresh(op.outputs[0], reason)]
        units = self._coarsen(g, per_in)
        self._record(((units, per_in),), layer, "passes")
        return [((units, per_out),)]

    def _coarsen(self, root: int, width: int) -> int:
        """Replaces group `root` by a group of its blocks of `width` channels, everywhere."""
        units = self.uf.new(self.uf.size[root] // width)

        def coarse(layout: Layout) -> Layout:
            return tuple(
                (units, m * width) if self.uf.find(g) == root else (g, m) for g, m in layout
            )

        self.layouts = {key: coarse(layout) for key, layout in self.layouts.items()}
        self.first_inputs = {k: [coarse(lay) for lay in v] for k, v in self.first_inputs.items()}
        self.members = [
            (units, dataclasses.replace(m, mult=m.mult * width)) if self.uf.find(g) == root
            else (g, m)
            for g, m in self.members
        ]  # fmt: skip
        self.produced = {
            k: units if self.uf.find(g) == root else g for k, g in self.produced.items()
        }
        self.retired.add(root)
        return units

    def _depthwise(self, op: graph.Op, layout: Layout, multiplier: int) -> list[Layout]:
        self._record(layout, op.layer, "passes")
        return [tuple((g, mult * multiplier) for g, mult in layout)]

    def _normalization(self, op: graph.Op, layout: Layout) -> list[Layout]:
        """BatchNorm keeps statistics per channel; a LayerNormalization over the channel
        axis computes them across the channels, and is exact under masks only as
        `surgery.MaskedLayerNormalization` (the masked reference and the search use it)."""
        axis = op.layer.axis if isinstance(op.layer.axis, (list, tuple)) else [op.layer.axis]
        rank = op.inputs[0].shape.rank
        if sorted(a % rank for a in axis) != [rank - 1]:
            return self._opaque(op, [layout], f"it normalizes over axis {op.layer.axis}")
        return self._pass(op, layout)

    def _preprocessing(self, op: graph.Op, layout: Layout) -> list[Layout]:
        self._block(layout, f"'{op.layer.name}' keeps per-channel preprocessing constants whole")
        return self._pass(op, layout)

    def _merge(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        channels = op.outputs[0].shape[-1]
        full = [lay for lay, kt in zip(ins, op.inputs) if kt.shape[-1] == channels]
        if not full:
            return self._opaque(op, ins, "no input has the output's channel count")
        for layout in full[1:]:
            self._unify(full[0], layout, op.layer)
        full = [self.layouts[id(kt)] for kt in op.inputs if kt.shape[-1] == channels]
        for layout in full:
            self._record(layout, op.layer, "passes")
        return [full[0]]

    def _concatenate(self, op: graph.Op, ins: list[Layout]) -> list[Layout]:
        rank = op.outputs[0].shape.rank
        if op.layer.axis % rank != rank - 1:
            return self._merge(op, ins)
        for layout in ins:
            self._record(layout, op.layer, "passes")
        return [tuple(seg for layout in ins for seg in layout)]

    def _flatten(self, op: graph.Op, layout: Layout) -> list[Layout]:
        positions = op.inputs[0].shape[1:-1]
        if None in positions:
            return self._opaque(op, [layout], "its input has unknown spatial dimensions")
        self._record(layout, op.layer, "passes")
        return [layout * math.prod(positions)]

    def _reshape(self, op: graph.Op, layout: Layout) -> list[Layout]:
        if op.outputs[0].shape[-1] != op.inputs[0].shape[-1]:
            return self._opaque(op, [layout], "it reshapes the channel axis")
        return self._pass(op, layout)

    def _opaque(self, op: graph.Op, ins: list[Layout], why: str) -> list[Layout]:
        layer = op.layer
        reason = f"it passes through '{layer.name}' ({type(layer).__name__}): {why}"
        if layer.name not in self.unsupported:
            self.unsupported.append(layer.name)
        for layout in ins:
            self._block(layout, reason)
        return [self._fresh(kt, reason) for kt in op.outputs]

    # -- the result --------------------------------------------------------------
    def _result(self, model: Any) -> ChannelAnalysis:
        ids: dict[int, int] = {}
        for g in range(len(self.uf.parent)):
            if self.uf.find(g) not in self.retired:
                ids.setdefault(self.uf.find(g), len(ids))
        groups = [
            ChannelGroup(
                id=gid,
                size=self.uf.size[root],
                prunable=root not in self.uf.reasons,
                reason=self.uf.reasons.get(root),
                members=[],
            )
            for root, gid in ids.items()
        ]
        for g, member in self.members:
            members = groups[ids[self.uf.find(g)]].members
            if member not in members:
                members.append(member)
        layouts = {
            key: tuple((ids[self.uf.find(g)], mult) for g, mult in layout)
            for key, layout in self.layouts.items()
        }
        return ChannelAnalysis(model, groups, layouts, self.unsupported)


def is_constant_operand(value: Any) -> bool:
    """Whether an argument of a TF op call is a value (a number, an array), not a tensor
    of the graph or an option (a name, a flag)."""
    return not isinstance(value, (KerasTensor, str, bool, type(None)))


def constant_operands(op: graph.Op) -> list:
    """The arguments of a TF op call that are values, not tensors of the graph."""
    return [v for v in tf.nest.flatten((op.call_args, op.call_kwargs)) if is_constant_operand(v)]


def attention_arguments(op: graph.Op) -> dict:
    """A MultiHeadAttention call's arguments by name (query, value, key, attention_mask...)."""
    return call_arguments(op.layer, op.call_args, op.call_kwargs)


def call_arguments(layer: Any, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of `layer` with `args` and `kwargs`, by the names of its
    `call`'s parameters."""
    return dict(inspect.signature(layer.call).bind_partial(*args, **kwargs).arguments)


def _channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") in ("channels_last", None)


def _mixes_channels(layer: Any) -> bool:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", activation) in _CHANNEL_MIXING_ACTIVATIONS
