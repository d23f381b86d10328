"""The per-operator LiteRT profile: each one-op model computes what its operator computes
inside the whole model, and the profile times every operator."""

import warnings

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import tfhybrid as th
from tfhybrid.export import flatbuffer, op_profile, tflite
from tfhybrid.techniques import magnitude

from models import APPLICATIONS


@pytest.fixture(scope="module")
def pruned_mobilenet():
    """MobileNetV2 (32 x 32) with half of every prunable group's channels removed (a real
    architecture: residual adds, depthwise convolutions, pads)."""
    model = APPLICATIONS["MobileNetV2"]()
    return th.prune_channels(model, magnitude.l1_removal(model, 0.5))


@pytest.fixture(scope="module")
def pruned_mobilenet_file(pruned_mobilenet, tmp_path_factory) -> bytes:
    """The pruned MobileNetV2 as a full-integer int8 `.tflite` file (quantization parameters
    and int8 kernels are what a cut must keep; a float file goes the same way)."""
    small = pruned_mobilenet
    inputs = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    path = tmp_path_factory.mktemp("op_profile") / "m.tflite"
    with warnings.catch_warnings():  # random weights: int8 may change near-tied top-1 classes
        warnings.simplefilter("ignore")
        th.export_tflite(small, path, quantize="int8", representative_data=inputs, samples=8)
    return path.read_bytes()


def builtin_interpreter(data: bytes, keep_all: bool = False) -> Interpreter:
    interpreter = Interpreter(
        model_content=data,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=keep_all,
    )
    interpreter.allocate_tensors()
    return interpreter


def test_each_one_op_model_computes_its_operator_as_in_the_whole_model(pruned_mobilenet_file):
    whole = builtin_interpreter(pruned_mobilenet_file, keep_all=True)
    detail = whole.get_input_details()[0]
    whole.set_tensor(detail["index"], tflite._random_input(detail, np.random.default_rng(1)))
    whole.invoke()
    graph = flatbuffer.read(pruned_mobilenet_file)
    assert {op.name for op in graph.operators} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"}
    for op in graph.operators:
        alone = builtin_interpreter(flatbuffer.single_op_model(pruned_mobilenet_file, op.index))
        feeds = [t for t in op.inputs if t >= 0 and not graph.tensors[t].constant]
        for detail, tensor in zip(alone.get_input_details(), feeds):
            alone.set_tensor(detail["index"], whole.get_tensor(tensor))
        alone.invoke()
        got = alone.get_tensor(alone.get_output_details()[0]["index"])
        np.testing.assert_array_equal(got, whole.get_tensor(op.outputs[0]), err_msg=op.name)


def test_the_profile_times_every_operator(pruned_mobilenet_file):
    profile = th.profile_ops(pruned_mobilenet_file, runs=3, warmup=1)
    graph = flatbuffer.read(pruned_mobilenet_file)
    assert [t.op for t in profile.ops] == [op.name for op in graph.operators]
    assert all(t.median_ms > 0 and t.kernels == "xnnpack" for t in profile.ops)
    assert profile.whole_ms > 0
    assert sum(profile.by_op_type().values()) == pytest.approx(profile.sum_ms)
    assert max(profile.by_op_type(), key=profile.by_op_type().get) == "CONV_2D"


def test_cutting_a_missing_operator_or_not_a_tflite_file_is_refused(pruned_mobilenet_file):
    count = len(flatbuffer.read(pruned_mobilenet_file).operators)
    with pytest.raises(ValueError, match=f"index {count} is out of range.*{count} operators"):
        flatbuffer.single_op_model(pruned_mobilenet_file, count)
    with pytest.raises(ValueError, match="not a .tflite file"):
        flatbuffer.single_op_model(b"not a model", 0)


def test_operator_macs_add_up_to_the_keras_profile(pruned_mobilenet, pruned_mobilenet_file):
    graph = flatbuffer.read(pruned_mobilenet_file)
    macs = sum(op_profile.op_macs(op, graph) for op in graph.operators)
    assert macs == th.profile(pruned_mobilenet).macs


def test_a_resized_operator_keeps_its_computation_and_takes_the_new_channel_counts(
    pruned_mobilenet_file,
):
    data = pruned_mobilenet_file
    graph = flatbuffer.read(data)
    rng = np.random.default_rng(2)
    for kind in flatbuffer.RESIZABLE:
        op = next(op for op in graph.operators if op.name == kind)
        cin = graph.tensors[op.inputs[0]].shape[-1]
        cout = graph.tensors[op.outputs[0]].shape[-1]
        same = builtin_interpreter(flatbuffer.resized_op_model(data, op.index, cin, cout))
        alone = builtin_interpreter(flatbuffer.single_op_model(data, op.index))
        detail = alone.get_input_details()[0]
        value = tflite._random_input(detail, rng)
        for interpreter in (same, alone):
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], value)
            interpreter.invoke()
        np.testing.assert_array_equal(
            same.get_tensor(same.get_output_details()[0]["index"]),
            alone.get_tensor(alone.get_output_details()[0]["index"]),
            err_msg=kind,
        )
        smaller = Interpreter(model_content=flatbuffer.resized_op_model(data, op.index, 3, 5))
        smaller.allocate_tensors()  # on XNNPACK, as it will be timed
        smaller.invoke()
        outputs = 3 * (cout // cin) if kind == "DEPTHWISE_CONV_2D" else 5
        assert smaller.get_input_details()[0]["shape"][-1] == 3, kind
        assert smaller.get_output_details()[0]["shape"][-1] == outputs, kind


def test_a_pointwise_resize_is_a_one_by_one_convolution_at_the_output_positions(
    pruned_mobilenet_file,
):
    graph = flatbuffer.read(pruned_mobilenet_file)
    stem = graph.operators[0]  # the 3 x 3, stride-2 stem convolution
    assert stem.name == "CONV_2D" and graph.tensors[stem.inputs[1]].shape[1:3] == (3, 3)
    cut = flatbuffer.read(flatbuffer.resized_op_model(pruned_mobilenet_file, 0, 7, 4, True))
    only = cut.operators[0]
    positions = graph.tensors[stem.outputs[0]].shape[1:3]
    assert cut.tensors[only.inputs[0]].shape == (1, *positions, 7)
    assert cut.tensors[only.inputs[1]].shape == (4, 1, 1, 7)
    assert cut.tensors[only.outputs[0]].shape == (1, *positions, 4)
    add = next(op for op in graph.operators if op.name == "ADD")
    with pytest.raises(ValueError, match="is ADD, not one of"):
        flatbuffer.resized_op_model(pruned_mobilenet_file, add.index, 1, 1)
