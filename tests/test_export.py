"""export_tflite / check_edgetpu / benchmark_tflite / quantize_aware on stripped models."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tfhybrid as th
from tfhybrid.export import flatbuffer, tflite
from tfhybrid.techniques import magnitude

from models import APPLICATIONS, lenet5, near_tied_logits

keras = th.keras


def templates_task(shape: tuple, count: int = 512, seed: int = 0):
    """10 classes, each a fixed random pattern plus noise: quickly learned, confidently."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((10, *shape)).astype(np.float32)
    labels = rng.integers(0, 10, count)
    inputs = patterns[labels] + 0.5 * rng.standard_normal((count, *shape)).astype(np.float32)
    return inputs, labels


def trained(model: keras.Model, data, epochs: int) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data, batch_size=64, epochs=epochs, verbose=0)
    return model


def tfmot_pruned(data, sparsity: float) -> keras.Model:
    """LeNet-5 pruned by TF-MOT to `sparsity` zeros per kernel, pruning wrappers stripped.

    Seeded and trained until its top-1 decisions are clear, so that int8 rounding
    does not flip near-ties (LeNet-5 outputs logits).
    """
    keras.utils.set_random_seed(0)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        lenet5(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(sparsity, 0, frequency=1)
    )
    pruned.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    pruned.fit(*data, epochs=2, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned)


@pytest.fixture(scope="module")
def lenet_data():
    return templates_task((28, 28, 1))


@pytest.fixture(scope="module")
def stripped_lenet(lenet_data):
    """LeNet-5 after a short DF search and `strip`, then trained on the task."""
    searched = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=4)
    searched.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    searched.fit(*lenet_data, batch_size=64, epochs=1, callbacks=[th.CompressionScheduler()])
    small = th.strip(searched)
    assert th.profile(small).macs <= 0.3 * th.profile(lenet5()).macs
    return trained(small, lenet_data, epochs=3)


@pytest.fixture(scope="module")
def unified_lenet(lenet_data):
    """LeNet-5 with 60% of its 1 x 4 blocks unified and 20% pruned, trained, stripped."""
    keras.utils.set_random_seed(0)
    searched = th.hybrid_compress(
        lenet5(), th.Budget(bits=0.5), [th.Unify(unify=0.6, prune=0.2)], search_steps=8
    )
    searched.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    searched.fit(*lenet_data, batch_size=64, epochs=3, callbacks=[th.CompressionScheduler()])
    return th.strip(searched)


@pytest.mark.parametrize("quantize,sparse", [("none", False), ("int8", False), ("int8", True)])
def test_a_unified_model_runs_in_litert_and_agrees(
    unified_lenet, lenet_data, quantize, sparse, tmp_path
):
    inputs, labels = lenet_data
    assert np.mean(np.argmax(unified_lenet(inputs[:256]), 1) == labels[:256]) > 0.9
    report = th.export_tflite(
        unified_lenet, tmp_path / "m.tflite", quantize, representative_data=inputs, sparse=sparse
    )
    if quantize == "none":
        assert report.check["max_rel_diff"] <= 1e-4
    else:
        assert report.check["top1_agreement"] >= 0.98, str(report)


@pytest.fixture(scope="module")
def lc_lenet(lenet_data):
    """LeNet-5 trained, then compressed by LC: conv2 a 4-value codebook, fc1 a 4-value
    codebook plus 2% of floats (two parts summed), fc2 at rank 8 (a factor pair); stripped."""
    keras.utils.set_random_seed(0)
    base = trained(lenet5(), lenet_data, epochs=2)
    parts = {"conv2": th.Quantize(4), "fc1": th.Quantize(4) + th.Prune(keep=0.02)}
    parts["fc2"] = th.LowRank(8)
    searched = th.hybrid_compress(base, th.Budget(bits=0.5), [th.LC(parts)], search_steps=16)
    searched.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    searched.fit(*lenet_data, batch_size=64, epochs=3, callbacks=[th.CompressionScheduler()])
    return th.strip(searched)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_an_lc_model_runs_in_litert_and_agrees(lc_lenet, lenet_data, quantize, tmp_path):
    inputs, labels = lenet_data
    names = {layer.name for layer in lc_lenet.layers}
    assert {"fc1_part0", "fc1_part1", "fc2_u", "fc2_v"} <= names
    assert np.mean(np.argmax(lc_lenet(inputs[:256]), 1) == labels[:256]) > 0.9
    report = th.export_tflite(lc_lenet, tmp_path / "m.tflite", quantize, representative_data=inputs)
    if quantize == "none":
        assert report.check["max_rel_diff"] <= 1e-4
    else:
        assert report.check["top1_agreement"] >= 0.98, str(report)


@pytest.fixture(scope="module")
def mobilenet_data():
    return templates_task((32, 32, 3))


@pytest.fixture(scope="module")
def stripped_mobilenet(mobilenet_data):
    """MobileNetV2 (32 x 32) with half of every prunable group's channels removed."""
    model = APPLICATIONS["MobileNetV2"]()
    small = th.prune_channels(model, magnitude.l1_removal(model, 0.5))
    assert th.profile(small).macs < 0.5 * th.profile(model).macs
    return trained(small, mobilenet_data, epochs=3)


MODES = ["none", "dynamic", "float16", "int8"]


@pytest.mark.parametrize(
    "name,mode",
    [
        *(("lenet", mode) for mode in MODES),
        ("mobilenet", "none"),
        ("mobilenet", "int8"),
        # the same conversions as LeNet-5's, 25 s each on MobileNetV2: under -m slow
        *(pytest.param("mobilenet", mode, marks=pytest.mark.slow) for mode in MODES[1:3]),
    ],
)
def test_every_quantize_mode_runs_in_litert_and_agrees(name, mode, request, tmp_path):
    """int8 is exported for the Edge TPU (the same file, plus its check)."""
    model = request.getfixturevalue(f"stripped_{name}")
    inputs, _ = request.getfixturevalue(f"{name}_data")
    target = "edgetpu" if mode == "int8" else None
    report = th.export_tflite(
        model, tmp_path / "m.tflite", quantize=mode, representative_data=inputs, target=target
    )
    assert (tmp_path / "m.tflite").stat().st_size == report.size_bytes > 0
    assert report.check["samples"] == 100
    if mode == "none":
        assert report.check["max_rel_diff"] <= 1e-4
        assert report.input_dtypes == report.output_dtypes == ["float32"]
    elif mode == "float16":
        assert report.check["max_rel_diff"] <= 1e-2
    else:
        assert report.check["top1_agreement"] >= 0.98
    if mode == "int8":
        assert report.input_dtypes == report.output_dtypes == ["int8"]
        assert not {"DEQUANTIZE", "QUANTIZE"} & report.ops.keys()
        assert report.edgetpu.ok, str(report.edgetpu)
        assert report.edgetpu.ops_on_edgetpu == report.edgetpu.ops_total == sum(report.ops.values())
        assert "Edge TPU: all" in str(report)


def test_int8_that_loses_the_top1_class_warns(tmp_path):
    model = near_tied_logits()
    data = np.random.default_rng(0).random((50, 4), np.float32)
    with pytest.warns(UserWarning, match="top-1 agreement with the Keras model is 0%"):
        report = th.export_tflite(
            model, tmp_path / "m.tflite", quantize="int8", representative_data=data
        )
    assert report.check["top1_agreement"] == 0.0
    assert "quantize_aware" in str(report)


def test_report_counts_the_ops_of_the_stripped_model(stripped_lenet, tmp_path):
    report = th.export_tflite(stripped_lenet, tmp_path / "m.tflite")
    dense_like = [
        la
        for la in stripped_lenet.layers
        if isinstance(la, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    convs_and_fcs = report.ops.get("CONV_2D", 0) + report.ops.get("FULLY_CONNECTED", 0)
    assert convs_and_fcs == len(dense_like)
    assert "MAX_POOL_2D x2" in str(report)


def test_uint8_io_for_int8(stripped_lenet, lenet_data, tmp_path):
    report = th.export_tflite(
        stripped_lenet,
        tmp_path / "m.tflite",
        quantize="int8",
        representative_data=tf.data.Dataset.from_tensor_slices(lenet_data).batch(32),
        io_dtype="uint8",
    )
    assert report.input_dtypes == report.output_dtypes == ["uint8"]
    assert report.check["top1_agreement"] >= 0.98


def test_two_input_model_with_a_generator_of_labelled_examples(tmp_path):
    left, right = keras.Input((4,)), keras.Input((3,))
    x = keras.layers.Concatenate()([keras.layers.Dense(5)(left), right])
    model = keras.Model([left, right], keras.layers.Dense(2)(x))
    rng = np.random.default_rng(0)
    batches = [((rng.normal(size=(8, 4)), rng.normal(size=(8, 3))), np.zeros(8)) for _ in range(3)]
    report = th.export_tflite(
        model, tmp_path / "m.tflite", representative_data=lambda: iter(batches), samples=20
    )
    assert report.check["samples"] == 20 and report.check["max_rel_diff"] <= 1e-4


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_model_with_many_inputs_gets_each_input_where_it_belongs(mode, tmp_path):
    """LiteRT lists a converted model's inputs in no fixed order; inputs of one shape
    fed (or quantized) in that order would run, and disagree. Input i ranges over
    about ±3(i + 1) and is scaled back to ±3."""
    inputs = [keras.Input((3,), name=f"in{i}") for i in range(12)]
    scaled = [keras.layers.Rescaling(1.0 / (i + 1))(x) for i, x in enumerate(inputs)]
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Concatenate()(scaled)))
    rng = np.random.default_rng(0)
    data = [(i + 1) * rng.normal(size=(16, 3)).astype(np.float32) for i in range(12)]
    report = th.export_tflite(
        model, tmp_path / "m.tflite", quantize=mode, representative_data=[tuple(data)]
    )
    assert report.check["max_rel_diff"] <= (1e-4 if mode == "none" else 0.05), str(report)


def test_sparse_encoding_shrinks_pruned_weights_and_says_it_is_not_faster(lenet_data, tmp_path):
    stripped = tfmot_pruned(lenet_data, 0.8)
    dense = th.export_tflite(stripped, tmp_path / "dense.tflite")
    sparse = th.export_tflite(stripped, tmp_path / "sparse.tflite", sparse=True)
    assert sparse.size_bytes < 0.6 * dense.size_bytes
    assert sparse.check["max_rel_diff"] <= 1e-4
    assert tflite.SPARSE_NOTE in sparse.notes and "not faster" in str(sparse)


def test_int8_sparse_runs_even_where_xnnpack_refuses_it(lenet_data, tmp_path):
    """XNNPACK cannot prepare sparse int8 fully-connected layers: LiteRT's built-in
    kernels check and time the file instead, and the report says so."""
    stripped = tfmot_pruned(lenet_data, 0.8)
    path = tmp_path / "sparse_int8.tflite"
    report = th.export_tflite(
        stripped, path, quantize="int8", representative_data=lenet_data[0][:50], sparse=True
    )
    assert report.check["top1_agreement"] >= 0.98
    refused = any("XNNPACK refused" in note for note in report.notes)
    assert th.benchmark_tflite(path, runs=3)["kernels"] == ("builtin" if refused else "xnnpack")


def test_edgetpu_flags_a_float_model(stripped_lenet, tmp_path):
    th.export_tflite(stripped_lenet, tmp_path / "m.tflite")
    report = th.check_edgetpu(tmp_path / "m.tflite")
    assert not report.ok
    assert {"float_io", "dtype"} <= report.kinds()
    assert report.ops_on_edgetpu == 0 and report.first_cpu_op.startswith("0 ")


def converted(model, representative, **options) -> bytes:
    """A converter run with options `export_tflite` does not offer (to make bad files)."""
    spec = tf.TensorSpec((options.pop("batch", 1), *model.inputs[0].shape[1:]))
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in representative[:20])
    for key, value in options.items():
        setattr(converter, key, value)
    return converter.convert()


def test_edgetpu_flags_float_io_of_an_otherwise_int8_model(stripped_lenet, lenet_data, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(converted(stripped_lenet, lenet_data[0]))
    report = th.check_edgetpu(path)
    assert "float_io" in report.kinds()
    assert "Model not quantized" in str(report)


def test_edgetpu_flags_a_dynamic_batch(stripped_lenet, lenet_data, tmp_path):
    th.export_tflite(
        stripped_lenet,
        tmp_path / "m.tflite",
        quantize="int8",
        representative_data=lenet_data[0][:50],
        batch_size=None,
    )
    report = th.check_edgetpu(tmp_path / "m.tflite")
    assert report.kinds() == {"dynamic_shape"}
    assert "batch_size=1" in str(report)


def test_edgetpu_flags_an_unsupported_op_and_where_the_cpu_takes_over(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.LeakyReLU(0.1, name="leaky")(x)
    outputs = keras.layers.Conv2D(2, 1, name="head")(x)
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).standard_normal((50, 8, 8, 3)).astype(np.float32)
    report = th.export_tflite(
        model, tmp_path / "m.tflite", representative_data=data, target="edgetpu"
    ).edgetpu
    assert report.kinds() == {"unsupported_op"}
    ops = [op.name for op in flatbuffer.read(tmp_path / "m.tflite").operators]
    assert report.first_cpu_op == f"{ops.index('LEAKY_RELU')} LEAKY_RELU"
    assert report.ops_on_edgetpu == ops.index("LEAKY_RELU") == 1


def test_edgetpu_flags_a_too_new_op_version(stripped_lenet, lenet_data, tmp_path, monkeypatch):
    path = tmp_path / "m.tflite"
    th.export_tflite(stripped_lenet, path, representative_data=lenet_data[0][:50], target="edgetpu")
    monkeypatch.setitem(th.export.edgetpu.SUPPORTED_OPS, "CONV_2D", 0)
    report = th.check_edgetpu(path)
    assert report.kinds() == {"op_version"}
    assert report.first_cpu_op.endswith("CONV_2D")


def test_check_edgetpu_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        th.check_edgetpu(tmp_path / "missing.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ValueError, match="not a .tflite file"):
        th.check_edgetpu(tmp_path / "junk.tflite")


def test_export_errors(stripped_lenet, tmp_path):
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match="needs representative_data"):
        th.export_tflite(stripped_lenet, path, quantize="int8")
    with pytest.raises(ValueError, match="needs representative_data"):
        th.export_tflite(stripped_lenet, path, target="edgetpu")
    with pytest.raises(ValueError, match="quantize='int4' is not one of"):
        th.export_tflite(stripped_lenet, path, quantize="int4")
    with pytest.raises(ValueError, match="conflicts"):
        th.export_tflite(stripped_lenet, path, quantize="float16", target="edgetpu")
    with pytest.raises(ValueError, match=r"takes \(None, 28, 28, 1\)"):
        th.export_tflite(stripped_lenet, path, representative_data=np.zeros((4, 32, 32, 3)))
    with pytest.raises(ValueError, match="target='gpu' is not one of"):
        th.export_tflite(stripped_lenet, path, target="gpu")
    with pytest.raises(ValueError, match="io_dtype='float32' is not one of"):
        th.export_tflite(stripped_lenet, path, quantize="int8", io_dtype="float32")
    with pytest.raises(ValueError, match="representative_data yielded no inputs"):
        th.export_tflite(stripped_lenet, path, representative_data=[])
    assert not path.exists()


def test_benchmark_tflite(stripped_lenet, tmp_path):
    th.export_tflite(stripped_lenet, tmp_path / "m.tflite")
    timing = th.benchmark_tflite(tmp_path / "m.tflite", threads=1, runs=10)
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    assert timing["runs"] == 10 and timing["threads"] == 1


def test_quantize_aware_bridge_to_an_edgetpu_ready_file(stripped_lenet, lenet_data, tmp_path):
    before = [w.copy() for w in stripped_lenet.get_weights()]
    qat = trained(th.quantize_aware(stripped_lenet), lenet_data, epochs=1)
    assert any("quant" in la.name for la in qat.layers)
    report = th.export_tflite(
        qat, tmp_path / "qat.tflite", representative_data=lenet_data[0][:100], target="edgetpu"
    )
    assert report.edgetpu.ok, str(report.edgetpu)
    assert report.check["top1_agreement"] >= 0.98
    assert all(np.array_equal(a, b) for a, b in zip(before, stripped_lenet.get_weights()))


def test_quantize_aware_keeps_pruned_zeros_at_zero(lenet_data):
    model = tfmot_pruned(lenet_data, 0.5)
    assert th.tfmot.has_pruned_weights(model)
    qat = trained(th.quantize_aware(model), lenet_data, epochs=1)
    kernels = [w.numpy() for w in qat.weights if w.name.endswith("kernel:0")]
    assert kernels and all(np.mean(k == 0) >= 0.49 for k in kernels)


def test_quantize_and_export_refuse_a_search_model():
    searched = th.hybrid_compress(lenet5(), th.Budget(macs=0.5))
    with pytest.raises(ValueError, match=r"quantize_aware\(tfhybrid.strip\(model\), ...\)"):
        th.quantize_aware(searched)
    with pytest.raises(ValueError, match=r"export_tflite\(tfhybrid.strip\(model\), ...\)"):
        th.export_tflite(searched, "never.tflite")
