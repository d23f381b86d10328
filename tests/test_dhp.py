"""techniques.dhp: hypernetwork-generated kernels, sparse latents, the stopping rule, strip."""

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid.techniques import dhp

from models import (
    assert_unchanged,
    lenet5,
    max_relative_diff,
    mnist_like,
    resnet_style,
    weights_snapshot,
)

keras = th.keras
layers = keras.layers


def inverted_residual() -> keras.Model:
    """MobileNetV2's block twice: expand 1x1, depthwise 3x3, project 1x1, an Add."""
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    for i in range(2):
        y = layers.Conv2D(24, 1, name=f"b{i}_expand")(x)
        y = layers.BatchNormalization(name=f"b{i}_expand_bn")(y)
        y = layers.ReLU(6.0, name=f"b{i}_relu")(y)
        y = layers.DepthwiseConv2D(3, padding="same", name=f"b{i}_depthwise")(y)
        y = layers.BatchNormalization(name=f"b{i}_depthwise_bn")(y)
        y = layers.Conv2D(8, 1, name=f"b{i}_project")(y)
        y = layers.BatchNormalization(name=f"b{i}_project_bn")(y)
        x = layers.Add(name=f"b{i}_add")([x, y])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name="inverted_residual")


def _inputs(model, n: int = 8) -> np.ndarray:
    shape = (n, *model.input_shape[1:])
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _fit(compressed, epochs: int, n: int = 64, optimizer="adam") -> None:
    x = _inputs(compressed, n)
    y = np.random.default_rng(1).integers(0, compressed.output_shape[-1], n)
    compressed.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [th.CompressionScheduler()]
    compressed.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=callbacks)


def _latents(compressed) -> dhp.Latents:
    return compressed.technique("dhp").gates_of(compressed)


@pytest.mark.parametrize("make", [lenet5, resnet_style, inverted_residual])
def test_the_hypernetworks_start_by_generating_the_models_kernels(make):
    model = make()
    snapshot, config = weights_snapshot(model), model.get_config()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), [th.DHP()], search_steps=10)
    x = _inputs(model)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-4, atol=1e-5)
    technique = compressed.technique("dhp")
    hypers = technique.hypers_of(compressed)
    kernels = {
        la.name: la.get_weights()[0]
        for la in model.layers
        if "conv" in type(la).__name__.lower() or isinstance(la, layers.Dense)
    }
    assert {h.layer.name for h in hypers} == set(kernels)  # every kernel that touches a group
    for hyper in hypers:
        emitted = technique.emitted(_latents(compressed), hyper).numpy()
        np.testing.assert_allclose(emitted, kernels[hyper.layer.name], rtol=1e-5, atol=1e-6)
    assert_unchanged(model, snapshot, config)


def test_a_channel_whose_latent_is_zero_goes_and_strip_computes_the_masked_model():
    model = resnet_style()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.9), [th.DHP()], search_steps=10)
    latents = _latents(compressed)
    index = latents.group_keys.index(["b1_c1"])
    latents.latents[index].assign(np.r_[np.zeros(6), np.ones(10)].astype(np.float32))
    compressed.finish_search()
    assert latents.keep[index].numpy().tolist() == [0.0] * 6 + [1.0] * 10
    small = th.strip(compressed)
    assert small.get_layer("b1_c1").filters == 10
    x = _inputs(model)
    assert max_relative_diff(small, compressed, x) < 1e-5
    # From then on each layer trains its emitted kernel, which strip keeps.
    kernel = compressed.get_layer("dhp_b1_c2").kernel.numpy()
    np.testing.assert_array_equal(small.get_layer("b1_c2").kernel.numpy(), kernel[:, :, 6:, :])


def test_latents_start_at_the_channels_norms_and_the_proximal_step_shrinks_them():
    model = lenet5()
    compressed = th.hybrid_compress(
        model, th.Budget(macs=0.2), [th.DHP(gamma=10.0)], search_steps=10
    )
    technique, latents = compressed.technique("dhp"), _latents(compressed)
    conv1 = latents.group_keys.index(["conv1"])
    norms = np.abs(model.get_layer("conv1").kernel.numpy()).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(latents.latents[conv1].numpy(), norms / norms.max(), rtol=1e-5)
    rate = float(compressed.compression_optimizer.learning_rate)
    before = [latent.numpy() for latent in latents.latents]
    technique.after_step(compressed)
    for latent, start in zip(latents.latents, before):
        largest = start >= np.sort(start)[-4]  # min_channels=4: never shrunk
        np.testing.assert_allclose(latent.numpy()[largest], start[largest])
        np.testing.assert_allclose(latent.numpy()[~largest], start[~largest] - 10 * rate, rtol=1e-5)
    assert int(latents.reached.numpy()) == 0
    # A group down to its minimum keeps its latents; so does every group once the
    # budget is met.
    latents.latents[conv1].assign(np.r_[np.zeros(16), np.ones(4)].astype(np.float32))
    before = [latent.numpy() for latent in latents.latents]
    technique.after_step(compressed)
    np.testing.assert_array_equal(latents.latents[conv1].numpy(), before[conv1])
    other = (conv1 + 1) % len(latents.latents)
    assert np.sum(latents.latents[other].numpy()) < np.sum(before[other])
    loose = th.hybrid_compress(lenet5(), th.Budget(macs=1.0), [th.DHP(gamma=10.0)], search_steps=10)
    before = [latent.numpy() for latent in _latents(loose).latents]
    loose.technique("dhp").after_step(loose)
    assert int(_latents(loose).reached.numpy()) == 1
    for latent, start in zip(_latents(loose).latents, before):
        np.testing.assert_array_equal(latent.numpy(), start)


def test_a_step_that_overshoots_the_budget_is_undone_and_the_weakest_channels_cut():
    model = resnet_style()
    compressed = th.hybrid_compress(
        model, th.Budget(macs=0.6), [th.DHP(gamma=950.0)], search_steps=100
    )
    technique, latents = compressed.technique("dhp"), _latents(compressed)
    for latent in latents.latents:  # close together: one step of 0.95 zeroes most of them
        latent.assign(np.linspace(0.9, 1.0, latent.shape[0]).astype(np.float32))
    technique.after_step(compressed)
    assert float(compressed.ratios(hard=True)["macs"]) < 0.3
    technique.after_step(compressed)
    assert technique.search_done(compressed)
    compressed.finish_search()
    macs = th.profile(th.strip(compressed)).ratios(th.profile(model))["macs"]
    assert 0.5 < macs <= 0.6


def test_the_default_gamma_zeroes_a_latent_without_gradient_in_half_the_search():
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.2), [th.DHP()], search_steps=40)
    shrink = compressed.technique("dhp").proximal_threshold(compressed)
    assert float(shrink) * 20 == pytest.approx(1.0)


@pytest.mark.parametrize("make", [resnet_style, inverted_residual])
def test_the_search_ends_once_the_budget_is_met_and_strips_within_it(make):
    model = make()
    compressed = th.hybrid_compress(
        model, th.Budget(macs=0.6), [th.DHP(gamma=100.0)], search_steps=1000
    )
    _fit(compressed, epochs=8)  # 32 steps
    assert compressed.search_finished()
    step = int(compressed.compression_step.numpy())
    assert step == 32  # it trains on, fine-tuning
    small = th.strip(compressed)
    assert th.profile(small).ratios(th.profile(model))["macs"] <= 0.6
    assert max_relative_diff(small, compressed, _inputs(model)) < 1e-4
    assert compressed.technique("dhp").scalars(compressed)["dhp/reached"] == 1


def test_depthwise_layers_read_their_groups_latents():
    compressed = th.hybrid_compress(
        inverted_residual(), th.Budget(macs=0.5), [th.DHP()], search_steps=10
    )
    latents = _latents(compressed)
    index = latents.group_keys.index(["b0_expand"])  # the expansion and its depthwise layer
    start = latents.latents[index].numpy()
    halved = np.where(np.arange(24) < 4, 0.5, 1.0).astype(np.float32) * start
    latents.latents[index].assign(halved)
    scale = (halved / halved.max()) / (start / start.max())
    hyper = compressed.get_layer("dhp_b0_depthwise")
    kernel = compressed.technique("dhp").emitted(latents, hyper).numpy()
    expected = hyper.kernel.numpy() * scale[:, None]  # (3, 3, 24, 1): channel c reads z[c]
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-7)


def test_a_search_saved_midway_resumes_with_its_latents_and_hypernetworks(tmp_path):
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), [th.DHP()], search_steps=200)
    _fit(compressed, epochs=1)
    latents = [v.numpy() for v in _latents(compressed).latents]
    assert any(np.any(v < 1) for v in latents)
    w2 = compressed.get_layer("dhp_conv2").w2.numpy()
    path = str(tmp_path / "mid.keras")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    for a, b in zip(_latents(loaded).latents, latents):
        np.testing.assert_array_equal(a.numpy(), b)
    np.testing.assert_array_equal(loaded.get_layer("dhp_conv2").w2.numpy(), w2)
    x = _inputs(loaded)
    np.testing.assert_allclose(loaded(x), compressed(x), rtol=1e-5, atol=1e-6)
    assert int(loaded.compression_step.numpy()) == 4 and not loaded.search_finished()


def test_bad_options_and_budgets_are_refused_and_other_layers_named():
    with pytest.raises(ValueError, match="gamma=0"):
        th.DHP(gamma=0)
    with pytest.raises(ValueError, match="threshold=1"):
        th.DHP(threshold=1)
    with pytest.raises(ValueError, match=r"cannot be met.*at 16 channel"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.1), [th.DHP(min_channels=16)])
    inputs = keras.Input((8, 8, 4))
    hidden = layers.Conv2D(8, 3, name="conv")(inputs)
    hidden = layers.SeparableConv2D(8, 3, name="separable")(hidden)
    outputs = layers.Dense(4, name="head")(layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="separable: DHP generates Dense, Conv2D"):
        compressed = th.hybrid_compress(model, th.Budget(macs=0.8), [th.DHP()], search_steps=4)
    assert [h.layer.name for h in compressed.technique("dhp").hypers_of(compressed)] == [
        "conv",
        "head",
    ]
    with pytest.raises(ValueError, match="conv1"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), [th.DF(), th.DHP()])


def test_it_searches_under_sgd_with_momentum_as_under_adam():
    x, _ = mnist_like(8)
    for optimizer in ("adam", keras.optimizers.SGD(0.05, momentum=0.9)):
        model = lenet5()
        compressed = th.hybrid_compress(model, th.Budget(macs=0.5), [th.DHP()], search_steps=8)
        _fit(compressed, epochs=3, optimizer=optimizer)
        small = th.strip(compressed)
        assert th.profile(small).ratios(th.profile(model))["macs"] <= 0.5
        assert max_relative_diff(small, compressed, x) < 1e-4
