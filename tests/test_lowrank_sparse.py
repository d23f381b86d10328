"""techniques.lowrank_sparse: W = L + S, alone, under a budget and stacked with DF."""

import math
import warnings

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tfhybrid as th
from tfhybrid import channels
from tfhybrid.techniques import df, lowrank_sparse
from tfhybrid.techniques.sparse import largest_mask

from models import (
    APPLICATIONS,
    MODERN,
    assert_unchanged,
    fit_search,
    lenet5,
    lenet_300_100,
    mnist_like,
    randomize_batchnorm,
    small_vit,
    weights_snapshot,
)

keras = th.keras
layers = keras.layers


def pointwise_model() -> keras.Model:
    """A strided 1 x 1 conv, a 3 x 3 conv (not taken) and two Dense layers.

    Biases start random, not 0: a unit that gets no gradient would keep a zero bias, which
    `profile` counts as a zero (and may store sparse) but a budget counts as a parameter.
    """
    bias = {"bias_initializer": "random_normal"}
    inputs = keras.Input((8, 8, 6))
    x = layers.Conv2D(16, 1, strides=2, activation="relu", name="pointwise", **bias)(inputs)
    x = layers.Conv2D(12, 3, name="spatial", **bias)(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(24, activation="relu", name="hidden", **bias)(x)
    outputs = layers.Dense(5, name="logits", **bias)(x)
    return keras.Model(inputs, outputs, name="pointwise_model")


def _parts(compressed) -> dict:
    return {w.layer.name: w.layer for w in th.LowRankSparse().layers_of(compressed)}


def test_it_starts_at_the_original_function_with_l_the_truncated_svd():
    model = pointwise_model()
    snapshot, config = weights_snapshot(model), model.get_config()
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.6), [th.LowRankSparse(rank=3, sparsity=0.5)], search_steps=4
    )
    parts = _parts(compressed)
    assert sorted(parts) == ["hidden", "logits", "pointwise", "spatial"]
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    assert parts.pop("spatial").rank == (3, 3)  # a Tucker-2 chain (tested below)
    for name, inner in parts.items():
        kernel = model.get_layer(name).get_weights()[0]
        matrix = kernel.reshape(-1, kernel.shape[-1])
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        truncated = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(inner.u.numpy() @ inner.v.numpy(), truncated, atol=1e-5)
        np.testing.assert_allclose(inner.sparse.numpy(), matrix - truncated, atol=1e-5)
    assert_unchanged(model, snapshot, config)


def test_strip_keeps_the_parts_as_plain_layers_computing_the_searched_model(tmp_path):
    model = pointwise_model()
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.6), [th.LowRankSparse(rank=3, sparsity=0.75)], search_steps=4
    )
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 6)).astype(np.float32)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.arange(16) % 5
    compressed.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[th.CompressionScheduler()])
    assert compressed.search_finished()
    small = th.strip(compressed)
    kinds = {type(la).__name__ for la in small.layers}
    assert kinds == {"InputLayer", "Conv2D", "Dense", "Add", "Activation", "Flatten"}
    for name in ("pointwise", "hidden"):  # the sum takes the layer's name; the activation follows
        assert isinstance(small.get_layer(name), layers.Add)
        assert small.get_layer(f"{name}_activation").activation is keras.activations.relu
    sparse = small.get_layer("hidden_sparse").kernel.numpy()
    assert np.mean(sparse == 0) == pytest.approx(0.75, abs=1 / sparse.size)  # exactly the share
    assert small.get_layer("pointwise_lowrank_in").strides == (2, 2)
    assert small.get_layer("pointwise_lowrank_out").kernel.shape == (1, 1, 3, 16)
    assert small.get_layer("spatial_lowrank_core").kernel.shape == (3, 3, 3, 3)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted = compressed.ratios(hard=True)
    measured = th.profile(small)
    original = th.profile(model)
    assert float(counted["macs"]) == pytest.approx(measured.macs / original.macs, rel=1e-6)
    assert float(counted["params"]) == pytest.approx(
        measured.nonzero_params / original.params, rel=1e-6
    )
    assert float(counted["bits"]) == pytest.approx(measured.bits / (32 * original.params), rel=1e-6)
    report = th.export_tflite(small, tmp_path / "small.tflite", representative_data=x)
    assert report.check["max_rel_diff"] < 1e-4 and report.check["top1_agreement"] == 1.0


def test_a_kxk_conv_keeps_a_tucker2_chain_started_at_its_hosvd(tmp_path):
    """Strided, padded and dilated 3 x 3 convs: L is the kernel's truncated HOSVD, L + S the
    kernel; after a search the strip computes the compression model."""
    inputs = keras.Input((12, 12, 5))
    x = layers.Conv2D(10, 3, strides=2, padding="same", activation="relu", name="down")(inputs)
    x = layers.Conv2D(9, 3, dilation_rate=2, padding="same", name="dilated")(x)
    outputs = layers.Conv2D(8, 3, name="valid", use_bias=False)(x)
    model = keras.Model(inputs, outputs)
    compressed = th.hybrid_compress(  # (half of each S: a whole number of entries)
        model, th.Budget(params=0.9), [th.LowRankSparse(rank=4, sparsity=0.5)], search_steps=4
    )
    parts = _parts(compressed)
    x = np.random.default_rng(6).normal(size=(8, 12, 12, 5)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    assert parts["down"].rank == (4, 4)
    kernel = model.get_layer("dilated").kernel.numpy()  # 3 x 3 x 10 x 9
    inner = parts["dilated"]
    u, v = inner.u.numpy(), inner.v.numpy().T
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)  # orthonormal factors
    input_side = np.linalg.svd(np.moveaxis(kernel, 2, 0).reshape(10, -1))[0][:, :4]
    np.testing.assert_allclose(np.abs(input_side.T @ u), np.eye(4), atol=1e-4)  # up to sign
    projected = np.einsum("hwio,ir,os->hwrs", kernel, u, v)
    np.testing.assert_allclose(inner.core.numpy(), projected, atol=1e-5)
    low = np.einsum("hwrs,ir,os->hwio", projected, u, v)
    np.testing.assert_allclose(inner.sparse.numpy(), kernel - low, atol=1e-5)
    compressed.compile("adam", "mse")
    y = model(x).numpy()
    compressed.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[th.CompressionScheduler()])
    small = th.strip(compressed)
    assert small.get_layer("down_lowrank_in").kernel.shape == (1, 1, 5, 4)
    assert small.get_layer("down_lowrank_core").strides == (2, 2)
    assert small.get_layer("dilated_lowrank_core").dilation_rate == (2, 2)
    assert small.get_layer("dilated_sparse").kernel.shape == (3, 3, 10, 9)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted, measured = compressed.ratios(hard=True), th.profile(small)
    original = th.profile(model)
    assert float(counted["macs"]) == pytest.approx(measured.macs / original.macs, rel=1e-6)
    assert float(counted["bits"]) == pytest.approx(measured.bits / (32 * original.params), rel=1e-6)
    table = th.summary(small, print_fn=lambda _: None, original=model)
    assert "Tucker-2 ranks 4, 4 + sparse" in table
    for quantize, tolerance in (("none", 1e-4), ("int8", 0.1)):
        path = tmp_path / f"{quantize}.tflite"
        report = th.export_tflite(small, path, quantize, representative_data=x, sparse=True)
        assert report.check["max_rel_diff"] < tolerance


def test_folded_layers_strip_whole_with_l_plus_s_as_their_kernel():
    model = pointwise_model()
    technique = th.LowRankSparse(rank=3, sparsity=0.5, fold=["spatial", "hidden"])
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    x = np.random.default_rng(8).normal(size=(16, 8, 8, 6)).astype(np.float32)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    scheduler = [th.CompressionScheduler()]
    compressed.fit(x, np.arange(16) % 5, batch_size=4, epochs=1, verbose=0, callbacks=scheduler)
    compressed.finish_search()
    small = th.strip(compressed)
    for name in ("spatial", "hidden"):  # the layer as it was, one kernel
        assert small.get_layer(name).get_config() == model.get_layer(name).get_config()
    assert isinstance(small.get_layer("pointwise"), layers.Add)  # not folded
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted, measured = compressed.ratios(hard=True), th.profile(small)
    original = th.profile(model)
    assert float(counted["macs"]) == pytest.approx(measured.macs / original.macs, rel=1e-6)
    assert float(counted["params"]) == pytest.approx(
        measured.nonzero_params / original.params, rel=1e-6
    )
    with pytest.raises(ValueError, match=r"it does not take \['flatten'\]"):
        th.hybrid_compress(model, th.Budget(params=0.9), [th.LowRankSparse(fold=["flatten"])])
    with pytest.raises(ValueError, match=r"folds every layer .* LowRankSparse\(rank=..., sparsity"):
        th.hybrid_compress(model, th.Budget(params=0.9), [th.LowRankSparse(fold=True)])


def test_a_share_of_the_weights_sets_tucker2_ranks_below_break_even():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(6, 5, name="one_channel_in")(inputs)  # 150 weights
    outputs = layers.Conv2D(32, 3, name="wide")(x)  # 1728 weights
    model = keras.Model(inputs, outputs)
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.95), [th.LowRankSparse(rank=0.9, sparsity=0.9)]
    )
    parts = _parts(compressed)
    assert parts["one_channel_in"].rank == (1, 4)  # 1 + 25*1*4 + 4*6 = 125 < 150
    r1, r2 = parts["wide"].rank
    assert r1 / 6 == pytest.approx(r2 / 32, abs=1 / 6)  # the same share of each side
    assert 0.75 * 1728 < 6 * r1 + 9 * r1 * r2 + 32 * r2 < 1728


@pytest.mark.parametrize(
    "plain, shape, rank",
    [
        (layers.Dense(30), (24, 30), 3),
        (layers.Conv2D(10, 3), (3, 3, 8, 10), [2, 2]),
    ],
)
def test_the_alternating_split_leaves_less_for_s_to_drop(plain, shape, rank):
    """On a low-rank kernel plus 3% of outliers, L fitted to the kernel less them leaves a
    residual whose kept 5% holds nearly all of it, unlike the plain SVD's (HOSVD's)."""
    rng = np.random.default_rng(7)
    config = {"class_name": type(plain).__name__, "config": plain.get_config()}
    inner = lowrank_sparse.LowRankPlusSparse(config, rank)
    factors, kernel = inner.low_part(rng.normal(size=shape))  # a random L of this rank
    outliers = rng.normal(0, 3, size=shape) * (rng.random(shape) < 0.03)
    kernel = (kernel + outliers).astype(np.float32)
    count = len(factors)

    def product(weights):  # L from its factors
        if count == 2:
            return weights[0] @ weights[1]
        return np.einsum("ir,hwrs,so->hwio", *weights[:3])

    def dropped(weights):  # what S loses when it keeps 5% of the residual
        residual = weights[count]
        return np.linalg.norm(residual - residual * largest_mask(residual, None, None, 0.05))

    svd = inner.initial_weights(kernel, None)
    found = lowrank_sparse.robust_outliers(inner.low_part, kernel, 0.05)
    alternating = inner.initial_weights(kernel, None, found)
    assert dropped(alternating) < 0.1 * dropped(svd)
    for weights in (svd, alternating):  # either way L + S is the kernel
        np.testing.assert_allclose(product(weights) + weights[count], kernel, atol=1e-4)


def test_a_params_budget_sets_the_rank_at_a_given_sparsity():
    model = lenet5()
    technique = th.LowRankSparse(rank=None, sparsity=0.9)
    compressed = th.hybrid_compress(model, th.Budget(params=0.2), [technique], search_steps=2)
    share = compressed.technique("lowrank_sparse").rank
    assert 0 < share < 0.2 and technique.rank is None  # the user's object unchanged
    ranks = {name: inner.rank for name, inner in _parts(compressed).items()}
    assert ranks["fc1"] == math.floor(share * math.ceil(800 * 500 / 1300))
    compressed.finish_search()
    measured = th.profile(th.strip(compressed)).nonzero_params / th.profile(model).params
    assert 0.19 < measured <= 0.2
    looser = th.hybrid_compress(
        model, th.Budget(params=0.3), [th.LowRankSparse(rank=None, sparsity=0.9)]
    )
    assert looser.technique("lowrank_sparse").rank > share
    with pytest.raises(ValueError, match=r"rank=None, sparsity=None\): give one of them"):
        th.LowRankSparse(rank=None)
    with pytest.raises(ValueError, match=r"at sparsity 0.1: at rank 1"):
        th.hybrid_compress(
            model, th.Budget(params=0.2), [th.LowRankSparse(rank=None, sparsity=0.1)]
        )


def test_the_cost_model_counts_both_parts_by_hand():
    inputs = keras.Input((20,))
    model = keras.Model(inputs, layers.Dense(30, name="fc")(inputs))
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.9), [th.LowRankSparse(rank=4, sparsity=0.5)]
    )
    costs = compressed.cost_model.costs(**{"lowrank_sparse": {"fc": (4, 0.5)}})
    # U 20x4 and V 4x30 (200), the bias (30), half of S's 600 entries; S's 600-bit bitmap.
    assert costs == {"macs": 200 + 600, "params": 530, "bits": 32 * 530 + 600}
    assert compressed.decisions(hard=True).lowrank_sparse == {"fc": (4, 0.5)}


def test_the_cost_model_counts_a_tucker2_chain_by_hand():
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, layers.Conv2D(6, 3, name="conv")(inputs))  # 6 x 6 out
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.9), [th.LowRankSparse(rank=2, sparsity=0.5)]
    )
    costs = compressed.cost_model.costs(lowrank_sparse={"conv": ((2, 3), 0.5)})
    # U 4x2 (8) at 64 input positions; core 3x3x2x3 (54) and V 3x6 (18) at 36; bias 6;
    # S 3x3x4x6 (216 entries, half kept), dense at 36 positions; its 216-bit bitmap.
    macs = 64 * 8 + 36 * (54 + 18) + 36 * 216
    assert costs == {"macs": macs, "params": 8 + 54 + 18 + 6 + 108, "bits": 32 * 194 + 216}
    assert compressed.decisions(hard=True).lowrank_sparse == {"conv": ((2, 2), 0.5)}


def test_a_params_budget_sets_the_sparsity_and_strip_meets_it():
    model = small_vit()
    technique = th.LowRankSparse(rank=0.25)
    compressed = th.hybrid_compress(model, th.Budget(params=0.8), [technique], search_steps=2)
    taken = set(_parts(compressed))
    assert "patches" in taken  # the patch embedding, a k x k conv: a Tucker-2 chain
    attention = {n for n in taken if isinstance(model.get_layer(n), layers.MultiHeadAttention)}
    assert attention == {"block0_attention", "block1_attention"}
    rest = taken - {"patches"} - attention
    assert all(isinstance(model.get_layer(n), layers.Dense) for n in rest)
    sparsity = compressed.technique("lowrank_sparse").sparsity
    assert 0 < sparsity < 1 and technique.sparsity is None  # the user's object unchanged
    compressed.finish_search()
    small = th.strip(compressed)
    share = th.profile(small).nonzero_params / th.profile(model).params
    assert 0.78 < share <= 0.8
    x = np.random.default_rng(2).normal(size=(2, *model.input_shape[1:])).astype(np.float32)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-4)


def test_it_stacks_with_df_filters_and_strips_exactly():
    """DF removes channels around fc1 (conv2's, which fc1 reads, and fc1's own, which its
    parts produce) and conv2 (a Tucker-2 chain): strip slices every part alike and computes
    the hard-masked model."""
    model = lenet5()
    technique = th.LowRankSparse(rank=16, sparsity=0.8, layers=["conv2", "fc1"])
    compressed = th.hybrid_compress(
        model, th.Budget(macs=0.5, params=0.5), [th.DF(ranks=False), technique], search_steps=8
    )
    rng = np.random.default_rng(3)
    for logits in df.gates_of(compressed).logits:
        logits.assign(rng.normal(0.1, 0.3, logits.shape).astype(np.float32))
    compressed.finish_search()
    small = th.strip(compressed)
    rows = small.get_layer("fc1_lowrank_in").kernel.shape[0]
    assert rows < 800 and small.get_layer("fc1_sparse").kernel.shape[0] == rows
    assert small.get_layer("fc1_sparse").kernel.shape[1] < 500
    assert small.get_layer("fc1_lowrank_out").kernel.shape[1] < 500
    assert small.get_layer("conv2_lowrank_in").kernel.shape[2] < 20
    assert small.get_layer("conv2_sparse").kernel.shape[2:] == (
        small.get_layer("conv2_lowrank_in").kernel.shape[2],
        small.get_layer("conv2_lowrank_out").kernel.shape[3],
    )
    x = np.random.default_rng(4).normal(size=(8, 28, 28, 1)).astype(np.float32)
    scale = np.abs(compressed(x).numpy()).max()
    np.testing.assert_allclose(small(x), compressed(x), atol=1e-5 * scale)
    measured = th.profile(small)
    counted = compressed.ratios(hard=True)
    assert float(counted["macs"]) == pytest.approx(measured.macs / th.profile(model).macs)
    assert float(counted["macs"]) <= 0.5 and float(counted["params"]) <= 0.5


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_search_saves_loads_and_resumes(tmp_path, suffix):
    technique = th.LowRankSparse(rank=8, sparsity=0.5, layers=["fc1", "fc2"], split="alternating")
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=8)
    x = mnist_like(8)[0]
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)  # L + S = W
    x = fit_search(compressed, epochs=1)
    path = str(tmp_path / f"lowrank_sparse{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.compression_step.numpy()) == 4
    assert loaded.technique("lowrank_sparse").split == "alternating"
    np.testing.assert_allclose(loaded(x[:4]), compressed(x[:4]), rtol=1e-5, atol=1e-6)
    fit_search(loaded, epochs=1)
    assert loaded.search_finished()
    np.testing.assert_allclose(th.strip(loaded)(x[:4]), loaded(x[:4]), rtol=1e-4, atol=1e-5)


def test_bad_input_gets_a_clear_error_and_leaves_the_model_alone():
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    with pytest.raises(ValueError, match=r"rank=0"):
        th.LowRankSparse(rank=0)
    with pytest.raises(ValueError, match=r"rank=1.5"):
        th.LowRankSparse(rank=1.5)
    with pytest.raises(ValueError, match=r"split='rpca'.*'svd', 'alternating'"):
        th.LowRankSparse(split="rpca")
    with pytest.raises(ValueError, match=r"sparsity=1.0"):
        th.LowRankSparse(sparsity=1.0)
    with pytest.raises(ValueError, match=r"layer 'fc2' \(500 x 10 kernel\).*below 10"):
        th.hybrid_compress(
            model, th.Budget(params=0.5), [th.LowRankSparse(rank=12, layers=["fc2"])]
        )
    with pytest.raises(
        ValueError, match=r"'conv1' \(5 x 5 x 1 x 20 kernel\).*Tucker-2 chain from rank 12 on"
    ):
        th.hybrid_compress(model, th.Budget(params=0.5), [th.LowRankSparse(rank=12)])
    blocks = th.LowRankSparse(sparsity=0.5, block_size=(1, 4))
    with pytest.raises(ValueError, match=r"conv2: TF-MOT prunes blocks \(\(1, 4\)\) only in 2-D"):
        th.hybrid_compress(model, th.Budget(params=0.5), [blocks], layers=["conv1", "conv2"])
    inputs = keras.Input((8, 8, 3))
    depthwise = keras.Model(inputs, layers.DepthwiseConv2D(3, name="dw")(inputs))
    with pytest.raises(ValueError, match=r"no layer to take(.|\n)*dw: .*not DepthwiseConv2D"):
        th.hybrid_compress(depthwise, th.Budget(params=0.5), [th.LowRankSparse()])
    with pytest.raises(ValueError, match="needs a params or bits budget"):
        th.hybrid_compress(model, th.Budget(macs=0.5), [th.LowRankSparse()])
    other = lenet5()
    one_unit = keras.Model(other.inputs, layers.Dense(1, name="unit")(other.output))
    with pytest.raises(ValueError, match=r"unit: its kernel holds fewer weights whole"):
        th.hybrid_compress(one_unit, th.Budget(params=0.9), [th.LowRankSparse(layers=["unit"])])
    with pytest.raises(
        ValueError, match=r"layer 'attention' \(its query projection, a 12 x 12 kernel\).*below 6"
    ):
        technique = th.LowRankSparse(rank=6, layers=["attention"])
        th.hybrid_compress(attention_model(), th.Budget(params=0.5), [technique])
    with pytest.raises(ValueError, match="cannot be met by LowRankSparse at these ranks"):
        th.hybrid_compress(model, th.Budget(params=0.01), [th.LowRankSparse(rank=0.9)])
    assert_unchanged(model, snapshot, config)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(lenet5())
    with pytest.raises(ValueError, match="already wrapped by TF-MOT"):
        th.hybrid_compress(pruned, th.Budget(params=0.5), [th.LowRankSparse(sparsity=0.5)])


def test_the_wrapper_prunes_s_alone():
    inner = lowrank_sparse.LowRankPlusSparse(
        {"class_name": "Dense", "config": layers.Dense(4).get_config()}, 2
    )
    inner.build((None, 6))
    assert inner.get_prunable_weights() == [inner.sparse]


def _started_and_stripped_exactly(model, technique, budget) -> tuple:
    """(compression model, stripped model, inputs): `model` (a zoo network) compressed by
    `technique`, checked to start at the original function, its search finished at once
    and stripped, checked to compute the same; no depthwise kernel taken."""
    compressed = th.hybrid_compress(model, budget, [technique], search_steps=4)
    taken = _parts(compressed)
    assert not any(isinstance(model.get_layer(n), layers.DepthwiseConv2D) for n in taken)
    x = np.random.default_rng(5).normal(size=(4, *model.input_shape[1:])).astype(np.float32)
    scale = np.abs(model(x).numpy()).max()
    np.testing.assert_allclose(compressed(x), model(x), atol=1e-4 * scale)
    compressed.finish_search()
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x), compressed(x), atol=1e-4 * scale)
    return compressed, small, x


def test_mobilenetv3_pointwise_convs_strip_exactly_and_int8_sparse_tflite_agrees(tmp_path):
    keras.utils.set_random_seed(0)
    model = randomize_batchnorm(MODERN["MobileNetV3Large"]())
    technique = th.LowRankSparse(rank=0.25, sparsity=0.8)
    compressed, small, x = _started_and_stripped_exactly(model, technique, th.Budget(params=0.9))
    parts = _parts(compressed)
    assert "expanded_conv/project" in parts and "Logits" in parts
    assert parts["Conv"].rank == (1, 4)  # the 3 x 3 stem, 3 -> 16 channels, as Tucker-2
    assert th.profile(small).nonzero_params <= 0.9 * th.profile(model).params
    # (float agreement is checked on the small model above: each export here takes 20 s)
    report = th.export_tflite(
        small, tmp_path / "int8.tflite", "int8", representative_data=x, sparse=True
    )
    # (random weights leave near-tied logits, so top-1 agreement says little here)
    assert report.check["max_rel_diff"] < 0.15


def test_a_budget_that_needs_s_over_99_percent_sparse_is_met():
    model = lenet_300_100()
    compressed = th.hybrid_compress(model, th.Budget(params=0.01), [th.LowRankSparse(rank=1)])
    assert compressed.technique("lowrank_sparse").sparsity > 0.99
    compressed.finish_search()
    assert float(compressed.ratios(hard=True)["params"]) == pytest.approx(0.01, abs=1e-5)
    measured = th.profile(th.strip(compressed)).nonzero_params / th.profile(model).params
    assert measured <= 0.01  # (less: profile does not count the zero biases)


def attention_model(heads: int = 3, key_dim: int = 4, value_dim: int = 5) -> keras.Model:
    """Self-attention over 6 tokens of 12 channels (query/key heads of 4, value heads of
    5), between two Dense layers, biases random."""
    bias = {"bias_initializer": "random_normal"}
    inputs = keras.Input((6, 12))
    x = layers.Dense(12, name="embed", **bias)(inputs)
    attention = layers.MultiHeadAttention(heads, key_dim, value_dim, name="attention", **bias)
    x = attention(x, x)
    return keras.Model(inputs, layers.Dense(4, name="logits", **bias)(x), name="attention_model")


def test_self_attention_keeps_each_projection_as_l_plus_s_started_at_its_svd():
    model = attention_model()
    snapshot, config = weights_snapshot(model), model.get_config()
    technique = th.LowRankSparse(rank=2, sparsity=0.5, layers=["attention"])
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    inner = _parts(compressed)["attention"]
    assert isinstance(inner, lowrank_sparse.LowRankSparseAttention)
    x = np.random.default_rng(6).normal(size=(4, 6, 12)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    kernels = [w.numpy() for w in model.get_layer("attention").weights if "kernel" in w.name]
    matrices = [k.reshape(12, -1) for k in kernels[:3]] + [kernels[3].reshape(-1, 12)]
    assert [m.shape for m in matrices] == [(12, 12), (12, 12), (12, 15), (15, 12)]
    for part, matrix in zip(lowrank_sparse.PROJECTIONS, matrices):
        u, v, sparse, _ = inner.factors[part]
        left, s, right = np.linalg.svd(matrix, full_matrices=False)
        truncated = (left[:, :2] * s[:2]) @ right[:2]
        np.testing.assert_allclose(u.numpy() @ v.numpy(), truncated, atol=1e-5)
        np.testing.assert_allclose(sparse.numpy(), matrix - truncated, atol=1e-5)
    assert compressed.decisions(hard=True).lowrank_sparse == {
        f"attention/{part}": (2, 0.5) for part in lowrank_sparse.PROJECTIONS
    }
    assert_unchanged(model, snapshot, config)


def test_the_cost_model_counts_an_attention_kept_as_l_plus_s_by_hand():
    model = attention_model()
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.9), [th.LowRankSparse(rank=2, sparsity=0.5, layers=["attention"])]
    )
    ranks = {"query": 2, "key": 1, "value": 3, "output": 2}
    costs = compressed.cost_model.costs(
        lowrank_sparse={f"attention/{p}": (r, 0.25) for p, r in ranks.items()}
    )
    # Projections as matrices: query and key 12 x 12, value 12 x 15, output 15 x 12, each
    # a pair r * (rows + cols) beside S (a quarter of its entries kept, bitmap indexed),
    # at 6 tokens; the scores and weighted sum: 6 x 6 x 3 heads x (4 + 5); biases 12 + 12
    # + 15 + 12; the Dense layers around: 12 x 12 + 12 and 12 x 4 + 4.
    pairs = 2 * 24 + 1 * 24 + 3 * 27 + 2 * 27
    entries = 144 + 144 + 180 + 180
    macs = 6 * (pairs + entries) + 6 * 6 * 3 * 9 + 6 * (144 + 48)
    params = pairs + entries / 4 + 51 + (156 + 52)
    assert costs == {"macs": macs, "params": params, "bits": 32 * params + entries}


@pytest.mark.parametrize("split", ["svd", "alternating"])
def test_strip_keeps_an_attention_as_plain_layers_around_an_attention_core(tmp_path, split):
    model = attention_model()
    technique = th.LowRankSparse(rank=2, sparsity=0.75, split=split)
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    x = np.random.default_rng(7).normal(size=(16, 6, 12)).astype(np.float32)
    compressed.compile("adam", "mse")
    y = np.random.default_rng(8).normal(size=(16, 6, 4)).astype(np.float32)
    compressed.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[th.CompressionScheduler()])
    assert compressed.search_finished()
    small = th.strip(compressed)
    kinds = {type(la).__name__ for la in small.layers}
    assert kinds == {"InputLayer", "Dense", "Add", "Reshape", "Permute", "Rescaling", "Attention"}
    assert isinstance(small.get_layer("attention"), layers.Add)  # the output projection's sum
    assert small.get_layer("attention_value_lowrank_out").kernel.shape == (2, 15)
    sparse = small.get_layer("attention_key_sparse").kernel.numpy()
    assert np.mean(sparse == 0) == pytest.approx(0.75, abs=1 / sparse.size)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted, measured, original = compressed.ratios(hard=True), th.profile(small), th.profile(model)
    assert float(counted["macs"]) == pytest.approx(measured.macs / original.macs, rel=1e-6)
    assert float(counted["params"]) == pytest.approx(
        measured.nonzero_params / original.params, rel=1e-6
    )
    assert float(counted["bits"]) == pytest.approx(measured.bits / (32 * original.params), rel=1e-6)
    path = str(tmp_path / "small.keras")
    small.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x), small(x), rtol=1e-6, atol=1e-6)
    compact = th.save_compact(small, str(tmp_path / "small.thc"), block=None)
    assert compact.counted_bits == measured.bits
    assert 0 <= 8 * compact.payload_bytes - measured.bits < 8 * len(small.weights)
    np.testing.assert_array_equal(th.load_compact(str(tmp_path / "small.thc"))(x), small(x))
    report = th.export_tflite(small, tmp_path / "small.tflite", representative_data=x)
    assert report.check["max_rel_diff"] < 1e-4


def test_a_folded_attention_strips_to_the_layer_it_was():
    model = attention_model()
    technique = th.LowRankSparse(rank=2, sparsity=0.5, fold=["attention"])
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    x = fit_search_on(compressed, np.random.default_rng(9).normal(size=(8, 6, 12)))
    small = th.strip(compressed)
    folded = small.get_layer("attention")
    assert folded.get_config() == model.get_layer("attention").get_config()
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted = compressed.ratios(hard=True)
    measured = th.profile(small)
    assert float(counted["macs"]) == pytest.approx(measured.macs / th.profile(model).macs)


def fit_search_on(compressed, x: np.ndarray) -> np.ndarray:
    """Runs `compressed`'s whole search on `x` (an `attention_model`'s input) towards zeros;
    returns x as float32."""
    x = x.astype(np.float32)
    compressed.compile("adam", "mse")
    y = np.zeros((len(x), 6, 4), np.float32)
    compressed.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    assert compressed.search_finished()
    return x


def test_attention_it_cannot_take_is_named_with_the_reason():
    inputs = keras.Input((6, 12))
    other = keras.Input((4, 12))
    attention = layers.MultiHeadAttention(2, 4, name="cross")
    cross = keras.Model([inputs, other], attention(inputs, other))
    with pytest.raises(ValueError, match=r"cross: it is not self-attention"):
        th.hybrid_compress(cross, th.Budget(params=0.5), [th.LowRankSparse(sparsity=0.5)])
    mask = keras.Input((6, 6))
    masked = layers.MultiHeadAttention(2, 4, name="masked")
    with_mask = keras.Model([inputs, mask], masked(inputs, inputs, attention_mask=mask))
    with pytest.raises(ValueError, match=r"masked: it is called with an attention mask"):
        th.hybrid_compress(with_mask, th.Budget(params=0.5), [th.LowRankSparse(sparsity=0.5)])


def test_df_and_lowrank_sparse_cannot_both_replace_an_attention():
    model = small_vit(size=16, width=32, depth=1)
    techniques = [th.DF(ranks=False), th.LowRankSparse(rank=0.2, sparsity=0.5)]
    with pytest.raises(ValueError, match=r"'block0_attention'.*df and lowrank_sparse.*skip="):
        th.hybrid_compress(model, th.Budget(macs=0.9), techniques, search_steps=4)
    techniques[0] = th.DF(ranks=False, skip=["block0_attention"])
    compressed = th.hybrid_compress(model, th.Budget(macs=0.9), techniques, search_steps=4)
    rng = np.random.default_rng(10)
    for logits in df.gates_of(compressed).logits:
        logits.assign(rng.normal(0.1, 0.3, logits.shape).astype(np.float32))
    compressed.finish_search()
    assert compressed.plan().remove  # DF removes channels: strip analyzes the parts' graph
    with warnings.catch_warnings():  # and does not warn of the heads' reshapes it added
        warnings.filterwarnings("error", message=channels.OPAQUE_WARNING)
        small = th.strip(compressed)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_an_attention_search_saves_loads_and_resumes(tmp_path, suffix):
    model = attention_model()
    technique = th.LowRankSparse(rank=2, sparsity=0.5)
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=8)
    x = np.random.default_rng(11).normal(size=(8, 6, 12)).astype(np.float32)
    y = np.zeros((8, 6, 4), np.float32)
    compressed.compile("adam", "mse")
    compressed.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    path = str(tmp_path / f"attention{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.compression_step.numpy()) == 4
    np.testing.assert_allclose(loaded(x), compressed(x), rtol=1e-5, atol=1e-6)
    loaded.compile("adam", "mse")
    loaded.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    assert loaded.search_finished()
    np.testing.assert_allclose(th.strip(loaded)(x), loaded(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_efficientnetb0_strips_exactly_and_meets_its_budget():
    """Its 1 x 1 convs (squeeze-and-excite's too), its 3 x 3 stem as a Tucker-2 chain and
    its head; depthwise convs are left whole."""
    keras.utils.set_random_seed(1)
    model = randomize_batchnorm(APPLICATIONS["EfficientNetB0"]())
    technique = th.LowRankSparse(rank=0.1)
    compressed, small, _ = _started_and_stripped_exactly(model, technique, th.Budget(params=0.5))
    parts = _parts(compressed)
    assert "block1a_se_reduce" in parts and "top_conv" in parts
    assert isinstance(parts["stem_conv"].rank, tuple)
    counted, measured = compressed.ratios(hard=True), th.profile(small)
    share = measured.nonzero_params / th.profile(model).params
    # (the fresh network's zero biases count in the budget, not among the non-zeros)
    assert share <= float(counted["params"]) <= 0.5
    assert float(counted["params"]) == pytest.approx(share, abs=5e-3)


def _rank_one_and_spiky(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two 64 x 64 kernels: one of rank 1 plus faint noise (L's kind), one of faint noise
    plus a fifth of its entries at +-1 (S's kind)."""
    faint = 0.01 * rng.normal(size=(2, 64, 64))
    low = np.outer(rng.normal(size=64), rng.normal(size=64)) + faint[0]
    spikes = (rng.random((64, 64)) < 0.2) * rng.choice([-1.0, 1.0], (64, 64))
    return low.astype(np.float32), (spikes + faint[1]).astype(np.float32)


def test_auto_split_gives_l_to_a_low_rank_kernel_and_leaves_spikes_to_s():
    low, spiky = _rank_one_and_spiky(np.random.default_rng(0))
    density = float(np.mean(np.abs(spiky) > 0.5))  # the spikes' share
    ranks, kept = lowrank_sparse.auto_split({"low": low}, density)
    assert ranks == {"low": 1} and kept == pytest.approx(density - 128 / 4096)
    ranks, kept = lowrank_sparse.auto_split({"spiky": spiky}, density)
    assert ranks == {"spiky": 0} and kept == density  # any L would cost S some spikes
    # one layer's kernels (an attention's projections) take one share and one density:
    # here L's gain on `low` outweighs the spikes S then drops
    ranks, kept = lowrank_sparse.auto_split({"a": low, "b": spiky}, density)
    assert ranks == {"a": 1, "b": 1} and kept == pytest.approx(density - 128 / 4096)


def spiky_model() -> keras.Model:
    """Dense 64 -> 64 -> 64 -> 10: `low` of rank 1 plus noise, `spiky` a fifth at +-1."""
    inputs = keras.Input((64,))
    x = layers.Dense(64, name="low", bias_initializer="random_normal")(inputs)
    x = layers.Dense(64, name="spiky", bias_initializer="random_normal")(x)
    model = keras.Model(inputs, layers.Dense(10, name="logits")(x), name="spiky_model")
    for name, kernel in zip(("low", "spiky"), _rank_one_and_spiky(np.random.default_rng(1))):
        model.get_layer(name).kernel.assign(kernel)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_auto_chooses_ranks_and_sparsities_per_layer_within_the_budget(tmp_path, suffix):
    model = spiky_model()
    snapshot, config = weights_snapshot(model), model.get_config()
    budget = th.Budget(params=0.2)
    technique = th.LowRankSparse(rank="auto")
    compressed = th.hybrid_compress(model, budget, [technique], search_steps=8)
    chosen = compressed.technique("lowrank_sparse")
    ranks, sparsities = chosen.get_config()["rank"], chosen.get_config()["sparsity"]
    assert ranks["low"] >= 1 and ranks["spiky"] == 0
    assert sparsities["low"] > sparsities["spiky"] == sparsities["logits"]  # L's share
    x = np.random.default_rng(2).normal(size=(16, 64)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-4)
    compressed.compile("adam", "mse")
    y = np.zeros((16, 10), np.float32)
    compressed.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    path = str(tmp_path / f"auto{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert loaded.technique("lowrank_sparse").get_config()["rank"] == ranks
    np.testing.assert_allclose(loaded(x), compressed(x), rtol=1e-5, atol=1e-6)
    loaded.compile("adam", "mse")
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    assert loaded.search_finished()
    small = th.strip(loaded)
    np.testing.assert_allclose(small(x), loaded(x), rtol=1e-4, atol=1e-4)
    assert isinstance(small.get_layer("spiky"), layers.Dense)  # rank 0: the plain layer
    spiky = small.get_layer("spiky").kernel.numpy()
    assert np.mean(spiky != 0) == pytest.approx(1 - sparsities["spiky"], abs=1 / spiky.size)
    measured = th.profile(small).nonzero_params / th.profile(model).params
    counted = float(loaded.ratios(hard=True)["params"])
    assert measured <= counted <= 0.2 and counted == pytest.approx(0.2, abs=1e-3)
    assert_unchanged(model, snapshot, config)


def test_ranks_and_sparsities_given_per_layer_with_rank_0_for_s_alone():
    model = pointwise_model()
    ranks = {"pointwise": 0, "spatial": [0, 0], "hidden": 2, "logits": 0}
    sparsity = {"pointwise": 0.5, "spatial": 0.7, "hidden": 0.6, "logits": 0.2}
    technique = th.LowRankSparse(rank=ranks, sparsity=sparsity)
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    parts = _parts(compressed)
    assert {n: p.rank for n, p in parts.items()} == {**ranks, "spatial": (0, 0)}
    assert [w.name.rpartition("/")[2] for w in parts["spatial"].weights] == ["sparse:0", "bias:0"]
    x = np.random.default_rng(3).normal(size=(4, 8, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    compressed.finish_search()
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    for name, share in sparsity.items():
        kernel = small.get_layer(name if name != "hidden" else "hidden_sparse").kernel.numpy()
        assert np.mean(kernel == 0) == pytest.approx(share, abs=1 / kernel.size)
    assert small.get_layer("pointwise").get_config()["strides"] == (2, 2)
    counted = compressed.ratios(hard=True)
    measured = th.profile(small)
    assert float(counted["macs"]) == pytest.approx(measured.macs / th.profile(model).macs)


def test_an_attention_projection_at_rank_0_strips_to_one_dense_layer():
    model = attention_model()
    ranks = {"attention/query": 0, "attention/key": 2, "attention/value": 0}
    ranks.update({"attention/output": 1, "embed": 0, "logits": 1})
    technique = th.LowRankSparse(rank=ranks, sparsity=0.5)
    compressed = th.hybrid_compress(model, th.Budget(params=0.9), [technique], search_steps=4)
    x = np.random.default_rng(12).normal(size=(8, 6, 12)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    x = fit_search_on(compressed, x)
    small = th.strip(compressed)
    names = {la.name for la in small.layers}
    assert {"attention_query", "attention_value", "embed"} <= names
    assert "attention_key_lowrank_in" in names and "attention_query_lowrank_in" not in names
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted = compressed.ratios(hard=True)
    measured = th.profile(small)
    assert float(counted["macs"]) == pytest.approx(measured.macs / th.profile(model).macs)


def test_per_layer_options_that_do_not_fit_get_a_clear_error():
    model = pointwise_model()
    budget = th.Budget(params=0.9)
    with pytest.raises(ValueError, match=r"rank='fast'"):
        th.LowRankSparse(rank="fast")
    with pytest.raises(ValueError, match=r"rank='auto', sparsity=0.5.*leave sparsity=None"):
        th.LowRankSparse(rank="auto", sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity=\{'hidden': 1.0\}"):
        th.LowRankSparse(rank=2, sparsity={"hidden": 1.0})
    with pytest.raises(ValueError, match=r"missing \['logits', 'spatial'\], unknown \['head'\]"):
        ranks = {"pointwise": 1, "hidden": 1, "head": 1}
        th.hybrid_compress(model, budget, [th.LowRankSparse(rank=ranks, sparsity=0.5)])
    with pytest.raises(ValueError, match=r"sparsity=\{...\}.*missing \['spatial'\]"):
        given = {"pointwise": 0.5, "hidden": 0.5, "logits": 0.5}
        th.hybrid_compress(model, budget, [th.LowRankSparse(rank=1, sparsity=given)])
    with pytest.raises(ValueError, match=r"rank=\(1, 1\).*layer 'hidden'.*r1, r2 only for"):
        ranks = {"pointwise": 1, "spatial": 1, "hidden": [1, 1], "logits": 1}
        th.hybrid_compress(model, budget, [th.LowRankSparse(rank=ranks, sparsity=0.5)])
    with pytest.raises(ValueError, match=r"rank=\(0, 2\).*layer 'spatial'"):
        ranks = {"pointwise": 1, "spatial": [0, 2], "hidden": 1, "logits": 1}
        th.hybrid_compress(model, budget, [th.LowRankSparse(rank=ranks, sparsity=0.5)])
    with pytest.raises(ValueError, match="needs a params or bits budget"):
        th.hybrid_compress(model, th.Budget(macs=0.5), [th.LowRankSparse(rank="auto")])


def test_a_budget_sets_the_rank_share_for_sparsities_given_per_layer():
    model = pointwise_model()
    sparsity = {"pointwise": 0.3, "spatial": 0.9, "hidden": 0.6, "logits": 0.2}
    technique = th.LowRankSparse(rank=None, sparsity=sparsity)
    compressed = th.hybrid_compress(model, th.Budget(params=0.5), [technique], search_steps=4)
    share = compressed.technique("lowrank_sparse").rank
    assert isinstance(share, float) and 0 < share < 1
    compressed.finish_search()
    assert float(compressed.ratios(hard=True)["params"]) <= 0.5
    small = th.strip(compressed)
    for name, kept in sparsity.items():
        kernel = small.get_layer(f"{name}_sparse").kernel.numpy()
        assert np.mean(kernel == 0) == pytest.approx(kept, abs=1 / kernel.size)
