"""Measure a model's latency table in LiteRT: each layer timed over a grid of kept
channels (`tfhybrid.latency.LatencyTable`, the cost form of `Budget(latency=...)`).

The model is converted once, as it will be exported (float32 or full-integer int8).
Each timed layer's operator is then cut out of that file with other channel counts
(`flatbuffer.resized_op_model`: every kept input count x every kept output count, and
for a layer that rank search may split, its second factor at every rank x output count)
and timed on its own: the same kernel, options and quantization as in the model, with no
conversion per variant. A one-op model pays the interpreter call that the whole model
pays once: the time of the model's cheapest operator alone stands for it and is taken
off each variant. Each layer's times are made non-decreasing in its kept channels
(timing noise aside, more channels never take less time).

The other operators (adds, pooling, padding, softmax, layers not timed), timed alone
too (`op_profile.profile_ops`), are the table's constant rest. In the whole model the
timed layers take longer than alone (on MobileNetV2 at 96 x 96 in int8, about a quarter
longer; likely their activations come from memory rather than cache), and under uniform
channel removal that extra shrinks with the channels, so each layer's times are scaled
by one factor that makes the table add up to the whole model's measured latency
(`LatencyTable.in_graph_scale`). Where a search keeps the layers that carry the extra,
it does not shrink, and the table predicts too little time (docs/latency.md).
"""

from __future__ import annotations

import math
import pathlib
import platform
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfhybrid import cost, graph
from tfhybrid._keras import DEPTHWISE_CONV, is_factorable, keras
from tfhybrid.export import flatbuffer
from tfhybrid.export.op_profile import profile_ops, time_model
from tfhybrid.export.tflite import converted
from tfhybrid.latency import LatencyTable, LayerLatency
from tfhybrid.training.model import refuse_search_model

#: The shares of a layer's channels the grid measures (0: one channel).
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def is_timed(layer: Any) -> bool:
    """Whether the table measures `layer`: a Dense, a plain channels-last Conv2D or a
    DepthwiseConv2D. Other layers' time stays in the table's constant rest."""
    depthwise = type(layer) is keras.layers.DepthwiseConv2D
    return is_factorable(layer) or (depthwise and layer.data_format == "channels_last")


def measure_latency_table(
    model: Any,
    quantize: str = "int8",
    threads: int = 1,
    *,
    fractions: Sequence[float] = FRACTIONS,
    representative_data: Any = None,
    runs: int = 30,
    warmup: int = 5,
) -> LatencyTable:
    """Times `model` and each of its layers over a grid of kept channels in LiteRT.

    Run it where the model will run (a phone's Python, a board): the table it saves is
    what `Budget(latency=..., latency_table=...)` reads.

    Args:
        model: a plain functional or Sequential tf_keras model (nested models are
            timed layer by layer).
        quantize: "none" (float32) or "int8" (full-integer), as the model will be
            exported.
        threads: interpreter threads.
        fractions: the shares of each layer's input and output channels to time
            (0 stands for one channel; the full count is always timed).
        representative_data: int8 calibration inputs (random inputs by default; the
            latency hardly depends on them).
        runs: timed inferences per operator and for the whole model.
        warmup: untimed inferences before each timing.

    Returns:
        The `LatencyTable`.

    Raises:
        ValueError: for a search model, an unknown `quantize`, or fractions outside [0, 1].
    """
    refuse_search_model(model, "measure_latency_table")
    if quantize not in ("none", "int8"):
        raise ValueError(f"measure_latency_table: quantize={quantize!r} is not 'none' or 'int8'.")
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"measure_latency_table: fractions must lie in [0, 1], got {fractions}.")
    timing = {"threads": threads, "runs": runs, "warmup": warmup}
    flat = graph.flatten(model)
    data = converted(flat, quantize, representative_data)
    whole = profile_ops(data, **timing)
    overhead_ms = min(op.median_ms for op in whole.ops)  # the cheapest op: ~all call overhead
    operators = _operators_by_key(flatbuffer.read(data))
    layers, untimed, timed_ops = {}, [], set()
    with tempfile.TemporaryDirectory() as folder:
        for layer, in_shape, out_shape in _layers_with_macs(flat):
            candidates = operators.get(_op_key(layer, in_shape, out_shape), [])
            if not is_timed(layer) or not candidates:
                untimed.append(layer.name)
                continue
            timed_ops.add(index := candidates.pop(0))
            time = _Timer(data, index, pathlib.Path(folder), timing, overhead_ms)
            layers[layer.name] = _layer_latency(layer, in_shape, out_shape, fractions, time)
    if untimed:
        warnings.warn(
            f"The latency table leaves {untimed} in its constant rest: it times Dense, "
            "Conv2D and DepthwiseConv2D layers that convert to one operator of their own.",
            stacklevel=2,
        )
    rest_ms = sum(
        max(0.0, op.median_ms - overhead_ms) for op in whole.ops if op.index not in timed_ops
    )
    isolated_ms = sum(lat.ms[-1][-1] for lat in layers.values())
    scale = (whole.whole_ms - rest_ms) / isolated_ms if isolated_ms > 0 else 1.0
    return LatencyTable(
        layers={name: lat.scaled(scale) for name, lat in layers.items()},
        whole_ms=whole.whole_ms,
        rest_ms=rest_ms,
        quantize=quantize,
        threads=threads,
        untimed=tuple(untimed),
        in_graph_scale=scale,
        machine=f"{platform.machine()} {platform.processor() or platform.platform()}".strip(),
    )


def channel_grid(full: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """The channel counts to time: each fraction of `full` (at least 1), `full`, and
    with any fraction below 1/2, two channels: a kernel may take a faster path for one
    channel alone (int8 LeNet-5's first convolution: 0.02 ms with one filter, 0.06 ms
    with 2 to 20), which a line from one channel to a quarter would spread over all."""
    small = {min(2, full)} if min(fractions) < 0.5 else set()
    return tuple(sorted({max(1, round(f * full)) for f in fractions} | {full} | small))


def _layers_with_macs(flat: Any) -> list[tuple]:
    """(layer, input shape, output shape) of each layer's first call that multiplies."""
    found, seen = [], set()
    for op in graph.ops(flat):
        layer = op.layer
        if layer.name in seen or not op.inputs:
            continue
        in_shape, out_shape = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
        if cost.layer_macs(layer, in_shape, out_shape):
            seen.add(layer.name)
            found.append((layer, in_shape, out_shape))
    return found


class _Timer:
    """Times one operator of the converted model at other channel counts (ms, less the
    one-op model's overhead)."""

    def __init__(self, data: bytes, index: int, folder: pathlib.Path, timing: dict, overhead):
        self.data, self.index, self.folder = data, index, folder
        self.timing, self.overhead_ms = timing, overhead

    def __call__(self, inputs: int, outputs: int, pointwise: bool = False) -> float:
        variant = flatbuffer.resized_op_model(self.data, self.index, inputs, outputs, pointwise)
        timing = time_model(variant, self.folder / "variant.tflite", self.timing)
        return max(0.0, timing["median_ms"] - self.overhead_ms)


def _layer_latency(layer, in_shape, out_shape, fractions, time: _Timer) -> LayerLatency:
    """`layer`'s `LayerLatency`: its operator timed over the grid."""
    cin = channel_grid(in_shape[-1], fractions)
    depthwise = isinstance(layer, DEPTHWISE_CONV)
    cout = (out_shape[-1],) if depthwise else channel_grid(out_shape[-1], fractions)
    ms = np.array([[time(c, o) for o in cout] for c in cin])
    split = None
    if is_factorable(layer):
        split = _rows(np.array([[time(r, o, pointwise=True) for o in cout] for r in cout]))
    return LayerLatency(cin, cout, _rows(ms), split)


def _rows(ms: np.ndarray) -> tuple:
    """`ms` as nested tuples, raised where needed so that it never falls as channels
    are added along either axis: timing noise must not reward a search for keeping more."""
    rising = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
    return tuple(map(tuple, rising.tolist()))


def _op_key(layer: Any, in_shape: tuple, out_shape: tuple) -> tuple:
    """How a layer's converted operator is found: its kind, input channels, output
    shape (batch 1) and kernel size (not its input's positions: the converter may fold
    a ZeroPadding2D before it into its padding)."""
    if isinstance(layer, keras.layers.Dense):
        return ("FULLY_CONNECTED", math.prod(in_shape[1:]), math.prod(out_shape[1:]))
    kind = "DEPTHWISE_CONV_2D" if isinstance(layer, DEPTHWISE_CONV) else "CONV_2D"
    return (kind, in_shape[-1], (1, *out_shape[1:]), tuple(layer.kernel_size))


def _operators_by_key(parsed: flatbuffer.Graph) -> dict:
    """Indices of the CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED operators, in
    execution order, by the key `_op_key` gives their layers (equal keys: the same
    computation)."""
    found = {}
    for op in parsed.operators:
        if op.name not in flatbuffer.RESIZABLE:
            continue
        first, kernel, out = (parsed.tensors[t].shape for t in (*op.inputs[:2], op.outputs[0]))
        if op.name == "FULLY_CONNECTED":
            key = (op.name, math.prod(first[1:]), math.prod(out[1:]))
        else:
            key = (op.name, first[-1], tuple(out), tuple(kernel[1:3]))
        found.setdefault(key, []).append(op.index)
    return found
