"""Keras model -> verified `.tflite` file, and LiteRT latency.

`export_tflite` converts (float, float16, dynamic-range or full-integer int8,
optionally with the converter's sparse weight encoding), writes the file, then
runs it with the LiteRT interpreter (`ai_edge_litert`) on sample inputs next to
the Keras model and reports how closely they agree. `benchmark_tflite` times it.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfhybrid.export import edgetpu, flatbuffer
from tfhybrid.training.model import refuse_search_model

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
TARGETS = (None, "edgetpu")
IO_DTYPES = {"int8": tf.int8, "uint8": tf.uint8}
#: Below this share of inputs with the same top-1 class as Keras, the export warns.
LOW_AGREEMENT = 0.9

SPARSE_NOTE = (
    "sparse=True stores mostly-zero weights in the converter's sparse encoding: the file "
    "shrinks, but inference on x86 is not faster: XNNPACK densifies float weights at load "
    "and refuses sparse int8 fully-connected layers, which then run on LiteRT's slower "
    "built-in kernels. Structured compression (fewer channels, lower rank) is what speeds "
    "it up."
)


@dataclasses.dataclass
class ExportReport:
    """What `export_tflite` wrote and how well it agrees with the Keras model.

    Attributes:
        path: the `.tflite` file.
        size_bytes: its size.
        quantize: the quantization mode; `sparse` whether sparse encoding was asked.
        ops: operator counts by type (e.g. {"CONV_2D": 2}).
        input_dtypes, output_dtypes: the interpreter's I/O dtypes (e.g. "int8").
        check: agreement with Keras on `samples` inputs: `max_abs_diff` and
            `max_rel_diff` (relative to the largest Keras output) of the dequantized
            outputs, and `top1_agreement` (share of inputs whose argmax agrees).
        edgetpu: the `check_edgetpu` report, for `target="edgetpu"`.
        notes: caveats the user should know (e.g. what sparse encoding does not do).
    """

    path: str
    size_bytes: int
    quantize: str
    sparse: bool
    ops: dict[str, int]
    input_dtypes: list[str]
    output_dtypes: list[str]
    check: dict[str, float]
    edgetpu: edgetpu.EdgeTPUReport | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        ops = ", ".join(f"{name} x{count}" for name, count in sorted(self.ops.items()))
        check = ", ".join(f"{k}={v:.4g}" for k, v in self.check.items())
        lines = [
            f"{self.path}: {self.size_bytes:,} bytes, quantize={self.quantize}"
            + (", sparse" if self.sparse else ""),
            f"  inputs {self.input_dtypes}, outputs {self.output_dtypes}",
            f"  ops: {ops}",
            f"  vs Keras: {check}",
            *(f"  note: {note}" for note in self.notes),
        ]
        if self.edgetpu is not None:
            lines.append("  " + str(self.edgetpu).replace("\n", "\n  "))
        return "\n".join(lines)


def export_tflite(
    model: Any,
    path: str | pathlib.Path,
    quantize: str = "none",
    representative_data: Any = None,
    target: str | None = None,
    sparse: bool = False,
    *,
    io_dtype: str = "int8",
    batch_size: int | None = 1,
    samples: int = 100,
) -> ExportReport:
    """Converts `model` to a `.tflite` file and checks it against the Keras model.

    Args:
        model: a plain tf_keras model (e.g. from `tfhybrid.strip`, or a TF-MOT QAT model).
        path: where to write the `.tflite` file.
        quantize: "none" (float32), "dynamic" (int8 weights, float activations),
            "float16" (float16 weights) or "int8" (full-integer: int8 weights and
            activations, integer inputs and outputs; needs `representative_data`).
        representative_data: inputs for int8 calibration, and for the numerical
            check in every mode: a `tf.data.Dataset` (of inputs or `(inputs, labels)`,
            batched or not), a numpy array of inputs, or an iterable / generator
            function yielding either.
        target: None, or "edgetpu": full-integer int8 and a `check_edgetpu` report.
        sparse: also store the weights in the converter's sparse encoding.
        io_dtype: "int8" or "uint8": the integer inputs/outputs of an int8 model.
        batch_size: the batch dimension of the file (None: dynamic, which the Edge
            TPU cannot run).
        samples: inputs used for calibration and for the check (random normal inputs
            when no `representative_data` is given).

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: for a search model (strip it first), an unknown `quantize`,
            `target` or `io_dtype`, an int8 export
            without `representative_data`, data that does not fit the model's input,
            or a conflicting `quantize` for `target="edgetpu"`.
    """
    refuse_search_model(model, "export_tflite")
    quantize = _checked_mode(quantize, target, io_dtype)
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            f"export_tflite(quantize='int8'{', target=' + repr(target) if target else ''}) "
            "needs representative_data: ~100 typical inputs (a tf.data.Dataset, a numpy "
            "array or a generator) to calibrate the activations' int8 ranges."
        )
    inputs = _sample_inputs(model, representative_data, samples)
    converter = _converter(model, batch_size, quantize, inputs, sparse, IO_DTYPES[io_dtype])
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_convert(converter))
    graph = flatbuffer.read(path)
    interpreter, fallback = _interpreter(path)
    report = ExportReport(
        path=str(path),
        size_bytes=path.stat().st_size,
        quantize=quantize,
        sparse=sparse,
        ops=dict(collections.Counter(op.name for op in graph.operators)),
        input_dtypes=[d["dtype"].__name__ for d in _input_details(interpreter)],
        output_dtypes=[d["dtype"].__name__ for d in interpreter.get_output_details()],
        check=_agreement(model, interpreter, inputs),
        notes=[note for note in (SPARSE_NOTE if sparse else None, fallback) if note],
    )
    if report.check["top1_agreement"] < LOW_AGREEMENT:
        note = _low_agreement(report, representative_data is not None)
        report.notes.append(note)
        warnings.warn(f"export_tflite: {note}", stacklevel=2)
    if target == "edgetpu":
        report.edgetpu = edgetpu.check_edgetpu(path)
    return report


def _low_agreement(report: ExportReport, representative: bool) -> str:
    """What a low top-1 agreement with Keras means, and what to try."""
    agreement, samples = report.check["top1_agreement"], int(report.check["samples"])
    found = (
        f"top-1 agreement with the Keras model is {agreement:.0%} on {samples} inputs "
        f"(below {LOW_AGREEMENT:.0%}): the {report.quantize} model does not predict what the "
        "Keras model predicts."
    )
    if not representative:
        return f"{found} These were random inputs: pass representative_data for a real check."
    if report.quantize == "int8":
        return (
            f"{found} Check that representative_data are typical inputs, scaled as in "
            "training; quantization-aware training (tfhybrid.quantize_aware) recovers "
            "accuracy that int8 loses."
        )
    return f"{found} Compare the model's outputs on these inputs to find where they part."


def benchmark_tflite(
    path: str | pathlib.Path, threads: int = 1, runs: int = 50, warmup: int = 5
) -> dict[str, float]:
    """LiteRT latency of one inference on random inputs, after `warmup` runs.

    Args:
        path: a `.tflite` file.
        threads: interpreter threads (1 is the usual phone-core comparison).
        runs: timed inferences.
        warmup: untimed inferences first (allocation, caches, XNNPACK packing).

    Returns:
        {"median_ms", "mean_ms", "min_ms", "p90_ms", "runs", "threads", "kernels"}, where
        kernels is "xnnpack" or "builtin" (when XNNPACK refuses the file).
    """
    interpreter, fallback = _interpreter(path, threads)
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], _random_input(detail, rng))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "runs": runs,
        "threads": threads,
        "kernels": "builtin" if fallback else "xnnpack",
    }


def converted(
    model: Any, quantize: str, representative_data: Any = None, samples: int = 8
) -> bytes:
    """`model` converted as `export_tflite` converts it (batch 1, int8 inputs and outputs
    for "int8"), without writing or checking the file; int8 calibrates on
    `representative_data` (random normal inputs when None)."""
    inputs = _sample_inputs(model, representative_data, samples)
    return _convert(_converter(model, 1, quantize, inputs, False, IO_DTYPES["int8"]))


def _checked_mode(quantize: str, target: str | None, io_dtype: str) -> str:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE_MODES}.")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}.")
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype={io_dtype!r} is not one of {tuple(IO_DTYPES)}.")
    if target == "edgetpu":
        if quantize not in ("none", "int8"):
            raise ValueError(
                f"target='edgetpu' runs only full-integer models; quantize={quantize!r} "
                "conflicts with it. Pass quantize='int8' (or leave it out)."
            )
        return "int8"
    return quantize


def _converter(model, batch_size, quantize, inputs, sparse, io_dtype) -> tf.lite.TFLiteConverter:
    """A TFLiteConverter of the model's inference function at a fixed batch size."""
    specs = [tf.TensorSpec((batch_size, *t.shape[1:]), t.dtype) for t in model.inputs]

    @tf.autograph.experimental.do_not_convert
    def serve(*args):
        return model(list(args) if len(args) > 1 else args[0], training=False)

    concrete = tf.function(serve).get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    optimizations = set()
    if quantize != "none":
        optimizations.add(tf.lite.Optimize.DEFAULT)
    if sparse:
        optimizations.add(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = list(optimizations)
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = lambda: map(_by_name, _examples(inputs))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    return converter


def _convert(converter: tf.lite.TFLiteConverter) -> bytes:
    """`converter.convert()`. int8 calibration by input name (see `_by_name`) runs in
    TensorFlow's own, deprecated interpreter; its deprecation warning concerns
    TensorFlow's code, not the user's, and is not passed on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated")
        return converter.convert()


def _sample_inputs(model: Any, data: Any, limit: int) -> list[np.ndarray]:
    """Up to `limit` examples per model input, as float arrays (N, *input shape)."""
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if data is None:
        rng = np.random.default_rng(0)
        return [rng.standard_normal((min(limit, 16), *s)).astype(np.float32) for s in shapes]
    columns: list[list[np.ndarray]] = [[] for _ in shapes]
    count = 0
    for element in _elements(data):
        parts = _as_inputs(element, len(shapes))
        batch = [_batched(np.asarray(p, np.float32), s, model.name) for p, s in zip(parts, shapes)]
        for column, part in zip(columns, batch):
            column.append(part)
        count += len(batch[0])
        if count >= limit:
            break
    if not count:
        raise ValueError("representative_data yielded no inputs.")
    return [np.concatenate(column)[:limit] for column in columns]


def _elements(data: Any) -> Iterable:
    if isinstance(data, np.ndarray):
        return [data]
    if isinstance(data, tf.data.Dataset):
        return data.as_numpy_iterator()
    if isinstance(data, Callable):
        return data()
    return data


def _as_inputs(element: Any, count: int) -> list:
    """The model inputs of one data element: `x`, `(x, y)` or `((x1, x2), y)`."""
    if not isinstance(element, (tuple, list)):
        return [element]
    if count == 1:
        return [element[0]]
    first = element[0]
    return list(first) if isinstance(first, (tuple, list)) else list(element)


def _batched(array: np.ndarray, shape: tuple, model_name: str) -> np.ndarray:
    if array.shape[1:] == shape:
        return array
    if array.shape == shape:
        return array[None]
    raise ValueError(
        f"representative_data gives inputs of shape {array.shape}, but model "
        f"'{model_name}' takes {(None, *shape)}. Pass inputs only (labels may follow in "
        "a tuple), with or without the batch dimension."
    )


def _interpreter(path, threads: int = 1) -> tuple[Interpreter, str | None]:
    """A ready LiteRT interpreter, and a note if XNNPACK refused the file.

    XNNPACK (LiteRT's default CPU delegate) cannot prepare some files, e.g. int8
    fully-connected layers in the sparse encoding; LiteRT's built-in kernels run them.
    """
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        return interpreter, None
    except RuntimeError as error:
        if "XNNPack" not in str(error):
            raise
        reason = str(error).splitlines()[0]
    interpreter = Interpreter(
        model_path=str(path),
        num_threads=threads,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    return (
        interpreter,
        f"XNNPACK refused this file ({reason}); checked on LiteRT's built-in kernels.",
    )


def _agreement(model, interpreter: Interpreter, inputs: list[np.ndarray]) -> dict[str, float]:
    """Keras vs LiteRT outputs (dequantized), one input at a time."""
    expected = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
    expected = expected[0] if isinstance(expected, list) else expected
    got = np.concatenate([_run(interpreter, example) for example in _examples(inputs)])
    diff = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected))) or 1.0
    agreement = np.mean(np.argmax(got, -1) == np.argmax(expected, -1))
    return {
        "samples": len(inputs[0]),
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "top1_agreement": float(agreement),
    }


def _examples(inputs: list[np.ndarray]) -> Iterable[list[np.ndarray]]:
    """One example at a time: a (1, ...) array per model input."""
    for i in range(len(inputs[0])):
        yield [x[i : i + 1] for x in inputs]


def _by_name(example: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One example keyed by the converted function's input names: calibration takes a
    list in the file's input order, which is not the model's (see `_input_details`)."""
    return {f"args_{i}": value for i, value in enumerate(example)}


def _run(interpreter: Interpreter, example: list[np.ndarray]) -> np.ndarray:
    """One inference; integer inputs are quantized and the first output dequantized."""
    for detail, value in zip(_input_details(interpreter), example):
        interpreter.set_tensor(detail["index"], _quantized(value, detail))
    interpreter.invoke()
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    scale, zero_point = detail["quantization"]
    if np.issubdtype(detail["dtype"], np.integer) and scale:
        return (output.astype(np.float32) - zero_point) * scale
    return output.astype(np.float32)


def _input_details(interpreter: Interpreter) -> list[dict]:
    """The interpreter's input details in the model's input order.

    The converted function takes the inputs as args_0, args_1, ...; LiteRT lists them
    in no fixed order (a 12-input model came back as args_5, args_2, args_3, ...).
    """

    def position(detail: dict) -> int:
        found = re.search(r"args_(\d+)", detail["name"])
        return int(found.group(1)) if found else 0

    return sorted(interpreter.get_input_details(), key=position)


def _quantized(value: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return value.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)


def _random_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
    shape = [d if d > 0 else 1 for d in detail["shape_signature"]]
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
