"""Model surgery: build physically smaller Keras models and copy their weights.

`prune_channels` removes channels of channel groups (or, as a reference, masks
them); `factorize` splits Dense / Conv2D layers by truncated SVD. Both return new
models and never modify the one passed in.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import channels, cost, graph, plan
from tfhybrid._keras import (
    CONV,
    DEPTHWISE_CONV,
    SEPARABLE_CONV,
    TRANSPOSED_CONV,
    TFOpLambda,
    is_factorable,
    is_grouped,
    keras,
)

L = keras.layers


@keras.utils.register_keras_serializable(package="tfhybrid")
class ChannelMask(L.Layer):
    """Multiplies the channel axis by a fixed 0/1 mask (the masked reference model).

    Args:
        mask: one 0/1 value per channel.
    """

    def __init__(self, mask: Iterable[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.mask = [float(v) for v in mask]

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs * tf.constant(self.mask, dtype=inputs.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "mask": self.mask}

    def compression_note(self) -> str:
        """What `tfhybrid.summary` shows for this layer."""
        return f"kept {int(sum(self.mask))}/{len(self.mask)} channels"


@keras.utils.register_keras_serializable(package="tfhybrid")
class MaskedLayerNormalization(L.LayerNormalization):
    """A LayerNormalization over the channel axis whose statistics count each channel
    by its mask: with a 0/1 mask, the layer the pruned model has on the kept channels.

    Zeroing a channel does not remove it from a LayerNormalization's mean and variance,
    so a channel mask alone would not compute what the pruned model computes. Here
    mean = sum(m * x) / sum(m) and var = sum(m * (x - mean)^2) / sum(m) over the channel
    axis; a search's soft masks weigh the channels in between.

    Args:
        mask: one value per channel, fixed (the masked reference model); or None, and
            each call passes `channel_weights`.
        **kwargs: LayerNormalization's arguments; `axis` must be the last axis.
    """

    def __init__(self, mask: Iterable[float] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.mask = None if mask is None else [float(v) for v in mask]

    @classmethod
    def of(cls, layer: Any, mask: Iterable[float] | None = None) -> graph.Replacement:
        """A replacement for LayerNormalization `layer`: this class, same config and weights."""
        config = {**layer.get_config(), "mask": mask}
        return graph.with_weights(cls.from_config(config), layer.get_weights())

    def call(self, inputs: tf.Tensor, channel_weights: tf.Tensor | None = None) -> tf.Tensor:
        if channel_weights is None:
            channel_weights = tf.constant(self.mask)
        weights = tf.cast(channel_weights, inputs.dtype)
        count = tf.reduce_sum(weights)
        mean = tf.reduce_sum(inputs * weights, -1, keepdims=True) / count
        centered = inputs - mean
        variance = tf.reduce_sum(weights * tf.square(centered), -1, keepdims=True) / count
        outputs = centered * tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * tf.cast(self.gamma, inputs.dtype)
        if self.center:
            outputs = outputs + tf.cast(self.beta, inputs.dtype)
        return outputs

    def get_config(self) -> dict:
        return {**super().get_config(), "mask": self.mask}

    def plain(self) -> plan.PlainLayer:
        """The plain LayerNormalization that `strip` puts in its place."""
        config = {k: v for k, v in self.get_config().items() if k != "mask"}
        return plan.PlainLayer("LayerNormalization", config, self.get_weights())


def prune_channels(model: Any, remove: Mapping[int, Iterable[int]], *, masked: bool = False):
    """Removes channels from channel groups.

    Args:
        model: a functional or built Sequential tf_keras model (not modified).
        remove: channel group id (see `channel_groups`) -> indices of the group's
            channels to remove.
        masked: if True, keep every shape and multiply every tensor of each group
            by its 0/1 mask instead (the reference the pruned model must equal).

    Returns:
        A new functional model (nested models inlined). With `masked=False` its
        layers are physically smaller, weights and BatchNorm statistics sliced.

    Raises:
        KeyError: for an unknown group id.
        ValueError: for a group that is not prunable, out-of-range or duplicate
            indices, or a removal of all channels of a group.
    """
    analysis = channels.analyze(model)
    keep = _kept_channels(analysis.groups, remove)
    if masked:
        return graph.rebuild(analysis.model, lambda op: _masked_op(op, analysis, keep))
    return graph.rebuild(analysis.model, lambda op: _pruned_op(op, analysis, keep))


def _kept_channels(groups: list, remove: Mapping[int, Iterable[int]]) -> dict:
    """Validates `remove` and returns group id -> sorted array of kept channels."""
    if not isinstance(remove, Mapping):
        raise TypeError(
            f"`remove` must map channel group ids to channel indices, got {type(remove).__name__}"
        )
    keep = {}
    for gid, indices in remove.items():
        if not isinstance(gid, (int, np.integer)) or not 0 <= gid < len(groups):
            raise KeyError(
                f"Channel group {gid!r} does not exist: this model has groups 0..{len(groups) - 1} "
                "(see tfhybrid.channel_groups(model))."
            )
        group = groups[gid]
        indices = [int(i) for i in indices]
        if not indices:
            continue
        if not group.prunable:
            raise ValueError(f"Channel group {gid} is not prunable: {group.reason}.")
        for i in indices:
            if not 0 <= i < group.size:
                raise ValueError(
                    f"Channel group {gid} has {group.size} channels (0..{group.size - 1}); "
                    f"channel index {i} is out of range."
                )
        if len(set(indices)) != len(indices):
            twice = sorted({i for i in indices if indices.count(i) > 1})
            raise ValueError(f"Channel group {gid}: channel indices {twice} are listed twice.")
        if len(indices) == group.size:
            raise ValueError(
                f"Removing all {group.size} channels of channel group {gid} would cut the "
                f"graph at layers {group.layers('produces') or group.layers()}; keep at least one."
            )
        keep[int(gid)] = np.setdiff1d(np.arange(group.size), indices)
    return keep


def _masked_op(op: graph.Op, analysis: channels.ChannelAnalysis, keep: dict):
    """A copy of the op's layer followed by a ChannelMask on each affected output."""
    masks = []
    for kt in op.outputs:
        kept = analysis.indices(kt, keep)
        if kept is None:
            masks.append(None)
            continue
        mask = np.zeros(kt.shape[-1], np.float32)
        mask[kept] = 1.0
        masks.append(ChannelMask(mask, name=f"{op.layer.name}_channel_mask"))
    kept_heads = _kept_heads(op, analysis, keep)
    if not any(m is not None for m in masks) and kept_heads is None:
        return None
    layer_call = graph.copy_of(op.layer)
    if isinstance(op.layer, L.LayerNormalization):  # its input carries the same mask
        layer_call = MaskedLayerNormalization.of(op.layer, masks[0].mask)
    if kept_heads is not None:
        layer_call = _without_heads(op.layer, kept_heads)

    def call(*args: Any, **kwargs: Any) -> Any:
        outputs = tf.nest.flatten(layer_call(*args, **kwargs))
        masked = [m(t) if m is not None else t for m, t in zip(masks, outputs)]
        return masked if len(masked) > 1 else masked[0]

    return call


def _pruned_op(op: graph.Op, analysis: channels.ChannelAnalysis, keep: dict):
    """A smaller copy of the op's layer, or None when its channels are untouched."""
    kept_in = analysis.indices(op.inputs[0], keep) if op.inputs else None
    kept_out = analysis.indices(op.outputs[0], keep)
    kept_heads = _kept_heads(op, analysis, keep)
    if kept_in is None and kept_out is None and kept_heads is None:
        return None
    layer = op.layer
    if isinstance(layer, TFOpLambda):
        return _sliced_constants(op, kept_out)
    if isinstance(layer, L.MultiHeadAttention):
        config, weights = _slice_attention(layer, kept_in, kept_out, kept_heads)
        return graph.with_weights(graph.clone_layer(layer, **config), weights)
    slicer = _slicer_of(layer, op)
    if slicer is not None:
        config, weights = slicer(layer, kept_in, kept_out)
        return graph.with_weights(graph.clone_layer(layer, **config), weights)
    if layer.weights:  # channels.py let a weighted layer into a group it cannot slice
        raise NotImplementedError(
            f"tfhybrid cannot slice the weights of layer '{layer.name}' "
            f"({type(layer).__name__}); please report this with the model."
        )
    return None  # no weights and no channel count in the config (Add, ReLU, pooling...)


def _take(array: np.ndarray, indices: np.ndarray | None, axis: int) -> np.ndarray:
    return array if indices is None else np.take(array, indices, axis=axis)


def _size(indices: np.ndarray | None, layer: Any, attr: str) -> int:
    return getattr(layer, attr) if indices is None else len(indices)


def _slice_conv(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Conv / Dense: kernel (..., in, out) and bias (out)."""
    weights = layer.get_weights()
    weights[0] = _take(_take(weights[0], kept_in, -2), kept_out, -1)
    if layer.use_bias:
        weights[1] = _take(weights[1], kept_out, 0)
    attr = "units" if isinstance(layer, L.Dense) else "filters"
    return {attr: _size(kept_out, layer, attr)}, weights


def _slice_transposed(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Transposed conv: kernel (..., out, in) and bias (out)."""
    weights = layer.get_weights()
    weights[0] = _take(_take(weights[0], kept_in, -1), kept_out, -2)
    if layer.use_bias:
        weights[1] = _take(weights[1], kept_out, 0)
    return {"filters": _size(kept_out, layer, "filters")}, weights


def _slice_depthwise(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Depthwise conv: kernel (..., in, multiplier) and bias (in * multiplier)."""
    weights = layer.get_weights()
    weights[0] = _take(weights[0], kept_in, -2)
    if layer.use_bias:
        weights[1] = _take(weights[1], kept_out, 0)
    return {}, weights


def _slice_separable(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Separable conv: depthwise (..., in, m), pointwise (..., in * m, out), bias (out)."""
    weights = layer.get_weights()
    mult = layer.depth_multiplier
    kept_mid = None if kept_in is None else (kept_in[:, None] * mult + np.arange(mult)).ravel()
    weights[0] = _take(weights[0], kept_in, -2)
    weights[1] = _take(_take(weights[1], kept_mid, -2), kept_out, -1)
    if layer.use_bias:
        weights[2] = _take(weights[2], kept_out, 0)
    return {"filters": _size(kept_out, layer, "filters")}, weights


def _slice_per_channel(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """BatchNorm, LayerNorm, PReLU: weights along the channel axis (a PReLU's shared
    axis stays 1)."""
    weights = [w if w.shape[-1] == 1 else _take(w, kept_in, -1) for w in layer.get_weights()]
    return {}, weights


def _slice_reshape(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Reshape that keeps the channel axis last: its target shape shrinks."""
    target = list(layer.target_shape)
    if target[-1] != -1:
        target[-1] = len(kept_out)
    return {"target_shape": tuple(target)}, []


def _slice_grouped(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
    """Grouped conv whose groups go whole: kernel (..., in / groups, out) and bias (out)
    keep the kept groups' outputs; each kept group keeps all its inputs."""
    weights = layer.get_weights()
    per_group = weights[0].shape[-2]
    groups = layer.groups if kept_in is None else len(kept_in) // per_group
    weights = [_take(w, kept_out, -1) for w in weights]
    return {"filters": _size(kept_out, layer, "filters"), "groups": groups}, weights


def _slice_attention(layer: Any, kept_in, kept_out, kept_heads) -> tuple[dict, list]:
    """Self-attention: the query, key and value kernels (in, heads, dim) keep the kept
    input channels and heads, their biases (heads, dim) the kept heads, the output
    projection (heads, dim, out) the kept heads and outputs, its bias the kept outputs.
    The output width becomes explicit, as it no longer follows the query's."""
    config, weights = layer.get_config(), layer.get_weights()
    for i, weight in enumerate(layer.weights):
        if "/attention_output/kernel" in weight.name:
            weights[i] = _take(_take(weights[i], kept_heads, 0), kept_out, -1)
        elif "/attention_output/" in weight.name:
            weights[i] = _take(weights[i], kept_out, -1)
        elif weight.shape.rank == 3:
            weights[i] = _take(_take(weights[i], kept_in, 0), kept_heads, 1)
        else:
            weights[i] = _take(weights[i], kept_heads, 0)
    if kept_in is not None:
        for key in ("query_shape", "key_shape", "value_shape"):
            if config.get(key):
                config[key] = [*config[key][:-1], len(kept_in)]
    config["output_shape"] = weights[-1].shape[-1]  # the output kernel's or bias's last axis
    if kept_heads is not None:
        config["num_heads"] = len(kept_heads)
    return config, weights


def _kept_heads(op: graph.Op, analysis: channels.ChannelAnalysis, keep: dict):
    """The heads an attention layer keeps (None: all, or not an attention layer)."""
    if not isinstance(op.layer, L.MultiHeadAttention):
        return None
    group = analysis.heads_group(op.layer.name)
    return None if group is None else keep.get(group.id)


def _without_heads(layer: Any, kept_heads) -> graph.Replacement:
    """A copy of attention `layer` whose removed heads write nothing (their rows of
    the output projection zeroed): the masked reference of removing them."""
    weights = layer.get_weights()
    for i, weight in enumerate(layer.weights):
        if "/attention_output/kernel" in weight.name:
            removed = np.setdiff1d(np.arange(weights[i].shape[0]), kept_heads)
            weights[i] = weights[i].copy()
            weights[i][removed] = 0.0
    return graph.with_weights(graph.clone_layer(layer), weights)


_SLICERS = (
    (TRANSPOSED_CONV, _slice_transposed),
    (DEPTHWISE_CONV, _slice_depthwise),
    (SEPARABLE_CONV, _slice_separable),
    ((*CONV, L.Dense), _slice_conv),
    ((L.BatchNormalization, L.LayerNormalization, L.PReLU), _slice_per_channel),
    (L.Reshape, _slice_reshape),
)


def _slicer_of(layer: Any, op: graph.Op) -> Any:
    """The function that slices `layer`'s config and weights (None: it has none)."""
    rule = channels.registered_rule(layer)
    if rule is not None:
        return rule.slice_weights or _registered_per_channel(rule, op.inputs[0].shape[-1])
    if is_grouped(layer):
        return _slice_grouped
    return next((slicer for family, slicer in _SLICERS if isinstance(layer, family)), None)


def _registered_per_channel(rule: channels.LayerRule, width: int):
    """The default slicing of a registered "passes" layer of `width` channels: every
    weight whose last axis has that length, along that axis (and its `channels_config`)."""

    def slicer(layer: Any, kept_in, kept_out) -> tuple[dict, list]:
        weights = [
            _take(w, kept_in, -1) if w.ndim and w.shape[-1] == width else w
            for w in layer.get_weights()
        ]
        config = {rule.channels_config: len(kept_in)} if rule.channels_config else {}
        return config, weights

    return slicer


def _sliced_constants(op: graph.Op, kept_out) -> graph.Replacement | None:
    """A TF op whose constant operands along the channel axis keep `kept_out` only."""
    if kept_out is None:
        return None
    width = op.outputs[0].shape[-1]
    call = graph.copy_of(op.layer)

    def sliced(value: Any) -> Any:
        if not channels.is_constant_operand(value) or not np.ndim(value):
            return value
        along_channels = np.shape(value)[-1] == width > 1
        return np.take(np.asarray(value), kept_out, axis=-1) if along_channels else value

    def replacement(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = tf.nest.map_structure(sliced, (args, kwargs))
        return call(*args, **kwargs)

    return replacement


def factorize(model: Any, ranks: Mapping[str, int], *, force: bool = False):
    """Splits Dense and Conv2D layers into two by truncated SVD.

    Dense(n -> m) becomes Dense(n -> r, no bias) + Dense(r -> m) with the original
    bias and activation. Conv2D k x k (c -> o) becomes Conv2D k x k (c -> r, no bias,
    same strides, padding and dilation) + Conv2D 1 x 1 (r -> o) with the original
    bias and activation. The singular values are split evenly (sqrt) between the
    two factors, so the product equals the rank-r truncated SVD of the kernel.

    Args:
        model: a functional or built Sequential tf_keras model (not modified).
        ranks: layer name -> rank r to keep.
        force: allow ranks that do not reduce the layer's MACs.

    Returns:
        A new functional model; the factor layers are named `<name>_u` and `<name>_v`.

    Raises:
        KeyError: for a name that is not a layer of the model.
        TypeError: for a layer that is not a Dense or plain Conv2D.
        ValueError: for a rank outside 1..full rank - 1, or one that does not reduce
            MACs (unless `force`).
    """
    flat = graph.flatten(model)
    calls = {}
    for op in graph.ops(flat):
        calls.setdefault(op.layer.name, op)
    names = {layer.name for layer in flat.layers}
    for name, rank in ranks.items():
        _check_rank(calls, names, name, rank, force)

    def replace(op: graph.Op):
        return _factorized(op.layer, ranks[op.layer.name]) if op.layer.name in ranks else None

    return graph.rebuild(flat, replace)


def _check_rank(calls: dict, names: set, name: str, rank: Any, force: bool) -> None:
    """Raises a clear error unless `name` can be factorized at `rank`."""
    factorable = sorted(n for n, op in calls.items() if is_factorable(op.layer))
    if name not in calls:
        raise KeyError(f"No layer named '{name}' in the model. Factorizable layers: {factorable}.")
    layer = calls[name].layer
    if not is_factorable(layer):
        raise TypeError(
            f"Layer '{name}' is a {type(layer).__name__} (groups={getattr(layer, 'groups', 1)}); "
            f"factorize handles Dense and plain Conv2D layers. Factorizable layers: {factorable}."
        )
    for new_name in (f"{name}_u", f"{name}_v"):
        if new_name in names:
            raise ValueError(f"Cannot factorize '{name}': a layer named '{new_name}' exists.")
    rows, cols = _kernel_matrix(layer.get_weights()[0]).shape
    full = min(rows, cols)
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank < full:
        raise ValueError(
            f"Rank {rank!r} for layer '{name}' is invalid: its kernel is a {rows} x {cols} "
            f"matrix of full rank {full}; choose a rank in 1..{full - 1}."
        )
    before, after = _macs_before_and_after_split(calls[name], int(rank))
    if after >= before and not force:
        largest = (rows * cols - 1) // (rows + cols)
        raise ValueError(
            f"Rank {rank} for layer '{name}' does not reduce its MACs ({after} >= {before}); "
            f"ranks up to {largest} do. Pass force=True to factorize anyway."
        )


def _kernel_matrix(kernel: np.ndarray) -> np.ndarray:
    """A Dense kernel as is; a conv kernel (kh, kw, c, o) as a (kh*kw*c) x o matrix."""
    return kernel.reshape(-1, kernel.shape[-1])


def _macs_before_and_after_split(op: graph.Op, rank: int) -> tuple[int, int]:
    """MACs of a Dense/Conv2D call, whole and split at `rank` (k x k to r, then 1 x 1)."""
    in_shape, out_shape = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
    first = cost.layer_macs(op.layer, in_shape, out_shape[:-1] + (rank,))
    positions = int(np.prod(out_shape[1:-1]))
    after = first + positions * rank * out_shape[-1]
    return cost.layer_macs(op.layer, in_shape, out_shape), after


def split_evenly(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B), A B the rank-`rank` truncated SVD of `matrix`, the singular values split
    evenly between the two (A = U_r sqrt(s), B = sqrt(s) V_r), so neither factor
    carries the scale alone when both are trained."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def _factorized(layer: Any, rank: int):
    """A replacement computing `layer` through its rank-`rank` truncated SVD."""
    weights = layer.get_weights()
    kernel = weights[0]
    first_kernel, second_kernel = split_evenly(_kernel_matrix(kernel), rank)
    first_kernel = first_kernel.reshape(kernel.shape[:-1] + (rank,))
    units = "units" if isinstance(layer, L.Dense) else "filters"
    first = graph.clone_layer(
        layer, name=f"{layer.name}_u", **{units: rank}, use_bias=False, activation="linear"
    )
    second_config = {"name": f"{layer.name}_v"}
    if isinstance(layer, L.Conv2D):
        second_kernel = second_kernel.reshape(1, 1, rank, -1)
        second_config.update(kernel_size=(1, 1), strides=(1, 1), padding="valid")
        second_config.update(dilation_rate=(1, 1))
    second = graph.clone_layer(layer, **second_config)
    first_call = graph.with_weights(first, [first_kernel.astype(kernel.dtype)])
    second_call = graph.with_weights(second, [second_kernel.astype(kernel.dtype), *weights[1:]])
    return lambda *args, **kwargs: second_call(first_call(*args, **kwargs))


def strip(model: Any, decided: plan.Plan):
    """Builds the plain, physically smaller model that a compression plan describes.

    Three steps, each exact: training-time layers are replaced by plain ones
    (`decided.replace`), channels are removed (`prune_channels`), and layers are split
    where their rank makes that cheaper (`factorize`).

    Args:
        model: a functional model holding training-time layers.
        decided: the techniques' merged plan (see `plan.Plan`).

    Returns:
        A plain functional `keras.Model`.
    """
    plain = graph.rebuild(model, lambda op: decided.replacement(op.layer.name))
    if decided.remove:
        # The groups to remove were chosen on the original model (and what it could not
        # see through warned of then); the layers a plan adds (e.g. an attention's heads
        # split out) need no second warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=channels.OPAQUE_WARNING)
            by_key = {g.key(): g.id for g in channels.channel_groups(plain)}
            keys = {k: decided.key_after_replacing(tuple(k)) for k in decided.remove}
            remove = {by_key[keys[k]]: v for k, v in decided.remove.items()}
            pruned = prune_channels(plain, remove)
    else:
        pruned = graph.flatten(plain)
    calls = {op.layer.name: op for op in graph.ops(pruned)}
    cheaper = {}
    for name, rank in decided.ranks.items():
        rows, cols = _kernel_matrix(calls[name].layer.get_weights()[0]).shape
        before, after = _macs_before_and_after_split(calls[name], rank)
        if rank < min(rows, cols) and after < before:
            cheaper[name] = int(rank)
    return factorize(pruned, cheaper) if cheaper else pruned
