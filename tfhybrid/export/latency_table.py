"""Measure a model's latency table in LiteRT: each layer timed over a grid of kept
channels (`tfhybrid.latency.LatencyTable`, the cost form of `Budget(latency=...)`).

Per layer, one model holds the layer's variants (every kept input count x every kept
output count, and for a layer that rank search may split, its second factor at every
rank x output count); it is converted as the whole model is (float32 or full-integer
int8), and each variant's operator is cut out and timed on its own
(`op_profile.time_op`). A one-op model pays one interpreter call, so the time of the
smallest op LiteRT runs is taken off each, and each layer's times are made
non-decreasing in its kept channels (timing noise aside, more channels never take
less time). What the timed layers leave of the whole
model's measured latency is the table's constant rest.
"""

from __future__ import annotations

import platform
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import cost, graph
from tfhybrid._keras import DEPTHWISE_CONV, is_factorable, keras
from tfhybrid.export import flatbuffer
from tfhybrid.export.op_profile import time_op
from tfhybrid.export.tflite import _converter, _sample_inputs, benchmark_tflite
from tfhybrid.latency import LatencyTable, LayerLatency
from tfhybrid.training.model import refuse_search_model

#: The shares of a layer's channels the grid measures (0: one channel).
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The operators that carry a timed layer's work.
_TIMED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


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
        representative_data: int8 calibration inputs for the whole model (random
            inputs by default; the latency hardly depends on them).
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
    whole_ms = _time_model(flat, quantize, representative_data, timing)
    overhead_ms = _time_model(_smallest_model(), quantize, None, timing)
    layers, untimed = {}, []
    for op in graph.ops(flat):
        layer = op.layer
        in_shape, out_shape = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
        if layer.name in layers or not cost.layer_macs(layer, in_shape, out_shape):
            continue
        if not is_timed(layer):
            untimed.append(layer.name)
            continue
        layers[layer.name] = _layer_latency(
            layer, in_shape, out_shape, quantize, fractions, timing, overhead_ms
        )
    if untimed:
        warnings.warn(
            f"The latency table leaves {untimed} in its constant rest: it times Dense, "
            "Conv2D and DepthwiseConv2D layers only.",
            stacklevel=2,
        )
    timed_ms = sum(lat.ms[-1][-1] for lat in layers.values())
    return LatencyTable(
        layers=layers,
        whole_ms=whole_ms,
        rest_ms=max(0.0, whole_ms - timed_ms),
        quantize=quantize,
        threads=threads,
        untimed=tuple(untimed),
        machine=f"{platform.machine()} {platform.processor() or platform.platform()}".strip(),
    )


def channel_grid(full: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """The channel counts to time: each fraction of `full` (at least 1), and `full`."""
    return tuple(sorted({max(1, round(f * full)) for f in fractions} | {full}))


def _layer_latency(layer, in_shape, out_shape, quantize, fractions, timing, overhead_ms):
    """`layer`'s `LayerLatency`, from one converted model of all its variants."""
    cin = channel_grid(in_shape[-1], fractions)
    depthwise = isinstance(layer, DEPTHWISE_CONV)
    cout = (out_shape[-1],) if depthwise else channel_grid(out_shape[-1], fractions)
    inputs = [keras.Input(in_shape[1:])]
    outputs, keys = [], {}
    for i, c in enumerate(cin):
        for j, o in enumerate(cout):
            variant = _variant(layer, o)
            outputs.append(variant(inputs[0][..., :c]))
            keys["ms", i, j] = _op_key(variant, c, o, in_shape)
    if is_factorable(layer):
        inputs.append(keras.Input((*out_shape[1:-1], out_shape[-1])))
        for i, r in enumerate(cout):
            for j, o in enumerate(cout):
                second = _second_factor(layer, o)
                outputs.append(second(inputs[1][..., :r]))
                keys["split", i, j] = _op_key(second, r, o, out_shape)
    timed = _time_ops(keras.Model(inputs, outputs), quantize, timing)
    table = {"ms": np.zeros((len(cin), len(cout))), "split": np.zeros((len(cout), len(cout)))}
    for (part, i, j), key in keys.items():
        if key not in timed:
            raise RuntimeError(f"Layer '{layer.name}': no converted operator matches {key}.")
        table[part][i, j] = max(0.0, timed[key] - overhead_ms)
    table = {part: _non_decreasing(ms) for part, ms in table.items()}
    return LayerLatency(
        cin=cin,
        cout=cout,
        ms=tuple(map(tuple, table["ms"].tolist())),
        split=tuple(map(tuple, table["split"].tolist())) if is_factorable(layer) else None,
    )


def _non_decreasing(ms: np.ndarray) -> np.ndarray:
    """`ms` raised where needed so that it never falls as channels are added along
    either axis: timing noise must not reward a search for keeping more."""
    return np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)


def _variant(layer: Any, outputs: int) -> Any:
    """`layer` with `outputs` output channels (a depthwise conv keeps its own), with a
    bias (where a BatchNormalization follows, the converter folds one in)."""
    if isinstance(layer, DEPTHWISE_CONV):
        return graph.clone_layer(layer, use_bias=True, name=None)
    width = {"units": outputs} if isinstance(layer, keras.layers.Dense) else {"filters": outputs}
    return graph.clone_layer(layer, use_bias=True, name=None, **width)


def _second_factor(layer: Any, outputs: int) -> Any:
    """The second factor of `layer` split by rank: a Dense, or a 1 x 1 Conv2D."""
    if isinstance(layer, keras.layers.Dense):
        return keras.layers.Dense(outputs, activation=layer.activation)
    return keras.layers.Conv2D(outputs, 1, activation=layer.activation)


def _op_key(layer: Any, inputs: int, outputs: int, in_shape: tuple) -> tuple:
    """How the converted operator of a variant is found: its filter's shape and, for
    a convolution, its input's shape."""
    if isinstance(layer, keras.layers.Dense):
        return ("FULLY_CONNECTED", (outputs, inputs))
    area = tuple(layer.kernel_size)
    spatial = tuple(in_shape[1:-1])
    if isinstance(layer, DEPTHWISE_CONV):
        filters = (1, *area, inputs * layer.depth_multiplier)
        return ("DEPTHWISE_CONV_2D", (1, *spatial, inputs), filters)
    return ("CONV_2D", (1, *spatial, inputs), (outputs, *area, inputs))


def _converted(model: Any, quantize: str, data: Any) -> bytes:
    inputs = _sample_inputs(model, data, 8)
    return _converter(model, 1, quantize, inputs, False, tf.int8).convert()


def _time_model(model: Any, quantize: str, data: Any, timing: dict) -> float:
    """The median latency (ms) of `model` converted as the table's model is."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/model.tflite"
        with open(path, "wb") as file:
            file.write(_converted(model, quantize, data))
        return benchmark_tflite(path, **timing)["median_ms"]


def _time_ops(model: Any, quantize: str, timing: dict) -> dict:
    """Median ms of each timed operator of the converted `model`, by `_op_key`."""
    data = _converted(model, quantize, None)
    parsed = flatbuffer.read(data)
    timed = {}
    with tempfile.TemporaryDirectory() as folder:
        for op in parsed.operators:
            if op.name not in _TIMED_OPS:
                continue
            filters = parsed.tensors[op.inputs[1]].shape
            key = (op.name, filters)
            if op.name != "FULLY_CONNECTED":
                key = (op.name, parsed.tensors[op.inputs[0]].shape, filters)
            if key not in timed:
                timed[key] = time_op(data, op.index, folder, **timing)["median_ms"]
    return timed


def _smallest_model() -> Any:
    """A model of one tiny op: what one interpreter call costs without work."""
    inputs = keras.Input((1,))
    return keras.Model(inputs, keras.layers.ReLU()(inputs))
