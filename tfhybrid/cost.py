"""Multiply-accumulates (MACs) and parameters per layer, from shapes alone.

MACs are those of one forward pass for batch size 1, counted for the layers that
multiply by weights (Conv, DepthwiseConv, SeparableConv, ConvTranspose, Dense), the
convention behind figures such as "MobileNetV2: 300M MACs". Element-wise layers
(BatchNorm, activations, Add, pooling) count 0 MACs; their parameters count.

Every formula has the form `MACs = a * cin + b * cin * cout`, with `cin`/`cout`
the layer's input/output channel counts, so the same terms serve exact counts
(ints) and a differentiable budget (soft channel counts as tensors).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

from tfhybrid import graph
from tfhybrid._keras import CONV, DEPTHWISE_CONV, SEPARABLE_CONV, TRANSPOSED_CONV, keras

L = keras.layers


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one layer call.

    Attributes:
        name: layer name.
        type: layer class name.
        output_shape: output shape without the batch axis.
        macs: multiply-accumulates of this call, batch size 1.
        params: parameters of the layer (counted at its first call only).
    """

    name: str
    type: str
    output_shape: tuple
    macs: int
    params: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """MACs and parameters of a model, in total and per layer call.

    Attributes:
        macs: total multiply-accumulates of one forward pass, batch size 1.
        params: total parameters (trainable and not), as `model.count_params()`.
        layers: one `LayerCost` per layer call, in topological order.
    """

    macs: int
    params: int
    layers: list[LayerCost]

    def layer(self, name: str) -> LayerCost:
        """The cost of the (first call of the) layer called `name`."""
        for cost in self.layers:
            if cost.name == name:
                return cost
        raise KeyError(f"No layer named '{name}' in this profile.")


def mac_terms(layer: Any, in_shape: tuple, out_shape: tuple) -> tuple[Fraction, Fraction]:
    """The terms (a, b) of `MACs = a * cin + b * cin * cout` for one layer call.

    Args:
        layer: the layer.
        in_shape: its input shape, batch axis first.
        out_shape: its output shape, batch axis first.

    Returns:
        (a, b), both zero for layers that do not multiply by weights.
    """
    out_positions = math.prod(out_shape[1:-1])
    if isinstance(layer, DEPTHWISE_CONV):
        area = math.prod(layer.kernel_size)
        return Fraction(out_positions * area * layer.depth_multiplier), Fraction(0)
    if isinstance(layer, SEPARABLE_CONV):
        area, mult = math.prod(layer.kernel_size), layer.depth_multiplier
        return Fraction(out_positions * area * mult), Fraction(out_positions * mult)
    if isinstance(layer, TRANSPOSED_CONV):
        in_positions = math.prod(in_shape[1:-1])
        return Fraction(0), Fraction(in_positions * math.prod(layer.kernel_size))
    if isinstance(layer, CONV):
        area = math.prod(layer.kernel_size)
        return Fraction(0), Fraction(out_positions * area, layer.groups)
    if isinstance(layer, L.Dense):
        return Fraction(0), Fraction(math.prod(in_shape[1:-1]))
    return Fraction(0), Fraction(0)


def layer_macs(layer: Any, in_shape: tuple, out_shape: tuple) -> int:
    """Exact MACs of one call of `layer` (batch size 1)."""
    a, b = mac_terms(layer, in_shape, out_shape)
    cin, cout = in_shape[-1], out_shape[-1]
    return int(a * cin + b * cin * cout)


def profile(model: Any) -> Profile:
    """MACs and parameters of a functional or Sequential model.

    Args:
        model: a functional or built Sequential tf_keras model (nested models are
            counted layer by layer).

    Returns:
        A `Profile` with `.macs`, `.params` and the per-layer breakdown.
    """
    flat = graph.flatten(model)
    costs, counted = [], set()
    for op in graph.ops(flat):
        layer = op.layer
        in_shape = tuple(op.inputs[0].shape) if op.inputs else ()
        out_shape = tuple(op.outputs[0].shape)
        macs = layer_macs(layer, in_shape, out_shape) if op.inputs else 0
        params = 0 if id(layer) in counted else layer.count_params()
        counted.add(id(layer))
        costs.append(LayerCost(layer.name, type(layer).__name__, out_shape[1:], macs, params))
    return Profile(macs=sum(c.macs for c in costs), params=model.count_params(), layers=costs)
