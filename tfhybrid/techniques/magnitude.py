"""Magnitude heuristics: uniform L1-norm filter pruning.

The classic one-shot baseline (Li et al. 2017, "Pruning filters for efficient
ConvNets"). It decides *what* to remove; `surgery.prune_channels` makes it physical.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfhybrid import channels


def channel_l1_norms(
    model: Any, analysis: channels.ChannelAnalysis | None = None
) -> dict[int, np.ndarray]:
    """L1 norm of every channel of every prunable group.

    A channel's norm sums the L1 norms of the kernel slices that produce it, over
    all producers of its group (e.g. both branches feeding a residual Add); a unit of
    several channels (a grouped conv's group) sums those of its channels; an attention
    head's is that of its slice of the output projection.

    Args:
        model: a functional or built Sequential tf_keras model.
        analysis: `channels.analyze(model)`, if the caller has it already.

    Returns:
        Group id -> array of one norm per channel, for prunable groups with a
        weighted producer.
    """
    analysis = analysis or channels.analyze(model)
    layers = {layer.name: layer for layer in analysis.model.layers}
    norms = {}
    for group in analysis.groups:
        if not group.prunable:
            continue
        total = np.zeros(group.size)
        for member in group.members:
            if member.role == "heads":
                kernel = _output_kernel(layers[member.layer])  # (heads, dim, out)
                total += np.abs(kernel.reshape(group.size, -1)).sum(axis=1)
            if member.role != "produces":
                continue
            kernel = _output_kernel(layers[member.layer])
            per_output = np.abs(kernel.reshape(-1, kernel.shape[-1])).sum(axis=0)
            span = per_output[member.offset : member.offset + group.size * member.mult]
            total += span.reshape(group.size, member.mult).sum(axis=1)  # a block: its sum
        if total.any():
            norms[group.id] = total
    return norms


def _output_kernel(layer: Any) -> np.ndarray:
    """The kernel whose last axis holds the layer's output channels (an attention
    layer's output projection, a separable convolution's pointwise kernel; the first
    weight of any other producer)."""
    for weight in layer.weights:
        if "/attention_output/kernel" in weight.name:
            return weight.numpy()
    if hasattr(layer, "pointwise_kernel"):
        return layer.pointwise_kernel.numpy()
    return layer.get_weights()[0]


def l1_removal(model: Any, fraction: float, round_to: int = 1) -> dict[int, np.ndarray]:
    """Channels to remove so every prunable group loses `fraction` of them.

    The channels with the smallest L1 norm go first; every group keeps at least one.

    Args:
        model: a functional or built Sequential tf_keras model.
        fraction: share of each group's channels to remove, in [0, 1).
        round_to: keep a multiple of this many channels per group (rounded up, at
            most the group's size): int8 and SIMD kernels run fastest on multiples
            of 8 or 16.

    Returns:
        A `remove` mapping for `prune_channels`.

    Raises:
        ValueError: for a fraction outside [0, 1) or round_to < 1.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to!r}")
    removal = {}
    for gid, norms in channel_l1_norms(model).items():
        keep = max(1, len(norms) - int(round(fraction * len(norms))))
        keep = min(len(norms), -(-keep // round_to) * round_to)
        if keep < len(norms):
            removal[gid] = np.sort(np.argsort(norms, kind="stable")[: len(norms) - keep])
    return removal
