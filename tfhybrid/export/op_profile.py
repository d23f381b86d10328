"""Where a `.tflite` model's time goes: LiteRT latency per operator.

The Python LiteRT interpreter has no op profiler, so each operator is cut out as a
model of its own (`flatbuffer.single_op_model`: its weights, options and
quantization kept, its other inputs fed random values of their type) and timed
with `benchmark_tflite`, on the kernels the whole model would use (XNNPACK, or
LiteRT's built-in ones where XNNPACK refuses an op). Each one-op model pays one
interpreter call's overhead, so the per-op times add up to a little more than
the whole model's; the report gives both.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import tempfile

from tfhybrid.export import flatbuffer
from tfhybrid.export.tflite import benchmark_tflite


@dataclasses.dataclass(frozen=True)
class OpTiming:
    """One operator's LiteRT latency, measured as a one-op model."""

    index: int
    #: The builtin name, e.g. "CONV_2D".
    op: str
    #: The name of its first output tensor (the converter names it after the Keras layer).
    output: str
    output_shape: tuple[int, ...]
    #: The schema's name of the output's type, e.g. "INT8".
    dtype: str
    median_ms: float
    #: "xnnpack", or "builtin" where XNNPACK refused the op.
    kernels: str
    #: Multiply-accumulates of a convolution or fully-connected op (0 for other ops).
    macs: int


@dataclasses.dataclass(frozen=True)
class OpProfile:
    """A model's per-operator latencies and its whole-model latency, in ms."""

    ops: list[OpTiming]
    whole_ms: float
    threads: int

    @property
    def sum_ms(self) -> float:
        """The per-op medians summed (one interpreter call's overhead per op included)."""
        return sum(t.median_ms for t in self.ops)

    def by_op_type(self) -> dict[str, float]:
        """Summed median ms per builtin op name, largest first."""
        totals = collections.Counter()
        for timing in self.ops:
            totals[timing.op] += timing.median_ms
        return dict(totals.most_common())


def profile_ops(
    model: str | pathlib.Path | bytes, threads: int = 1, runs: int = 50, warmup: int = 5
) -> OpProfile:
    """Times every operator of a `.tflite` model's main graph on its own, and the model.

    Args:
        model: a `.tflite` file or its bytes (one subgraph, no control flow).
        threads: interpreter threads, as for `benchmark_tflite`.
        runs: timed inferences per operator and for the whole model.
        warmup: untimed inferences before each timing.

    Returns:
        An `OpProfile`: per-operator medians in execution order, the whole model's median.

    Raises:
        ValueError: if the data is not a `.tflite` file or has several subgraphs.
    """
    data = model if isinstance(model, bytes) else pathlib.Path(model).read_bytes()
    graph = flatbuffer.read(data)
    timing = {"threads": threads, "runs": runs, "warmup": warmup}
    with tempfile.TemporaryDirectory() as folder:
        whole_ms = time_model(data, pathlib.Path(folder, "model.tflite"), timing)["median_ms"]
        timings = []
        for op in graph.operators:
            cut = flatbuffer.single_op_model(data, op.index)
            measured = time_model(cut, pathlib.Path(folder, f"op_{op.index}.tflite"), timing)
            output = graph.tensors[op.outputs[0]]
            timings.append(
                OpTiming(
                    index=op.index,
                    op=op.name,
                    output=output.name,
                    output_shape=output.shape,
                    dtype=output.dtype,
                    median_ms=measured["median_ms"],
                    kernels=measured["kernels"],
                    macs=op_macs(op, graph),
                )
            )
    return OpProfile(timings, whole_ms, threads)


def time_model(data: bytes, path: pathlib.Path, timing: dict) -> dict[str, float]:
    """`benchmark_tflite(path, **timing)` of the `.tflite` bytes `data`, written to `path`."""
    path.write_bytes(data)
    return benchmark_tflite(path, **timing)


def op_macs(op: flatbuffer.Operator, graph: flatbuffer.Graph) -> int:
    """Multiply-accumulates of one CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op
    (each output element times its filter's taps per output); 0 for other ops."""
    if op.name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        return 0
    outputs = math.prod(graph.tensors[op.outputs[0]].shape)
    # Filters: CONV_2D (out, kh, kw, in); DEPTHWISE_CONV_2D (1, kh, kw, out); FC (out, in).
    taps = graph.tensors[op.inputs[1]].shape[1:]
    if op.name == "DEPTHWISE_CONV_2D":
        taps = taps[:-1]
    return outputs * math.prod(taps)
