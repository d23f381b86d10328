"""techniques.sparse: TF-MOT pruning as a technique, alone and stacked with DF."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

import tfhybrid as th
from tfhybrid.techniques import sparse

from models import assert_unchanged, fit_search, lenet5, lenet_300_100, mnist_like, weights_snapshot

keras = th.keras


def _kernel_zeros(model) -> dict:
    return {
        la.name: float(np.mean(la.kernel.numpy() == 0))
        for la in model.layers
        if getattr(la, "kernel", None) is not None
    }


def test_sparse_alone_meets_a_params_budget_with_tfmots_wrappers():
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    technique = th.Sparse()
    compressed = th.hybrid_compress(model, th.Budget(params=0.3), [technique])
    wrappers = [la for la in compressed.layers if isinstance(la, sparse.SparseWrapper)]
    assert [w.layer.name for w in wrappers] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(isinstance(w, pruning_wrapper.PruneLowMagnitude) for w in wrappers)
    x = fit_search(compressed, epochs=4)  # 16 steps: the sparsity ramps over the first 8
    assert compressed.search_steps == 8 and compressed.search_finished()
    assert all(w.pruning_schedule.end_step == 8 for w in wrappers)
    small = th.strip(compressed)
    assert all(0.69 < share < 0.71 for share in _kernel_zeros(small).values())
    np.testing.assert_allclose(small(x[:8]), compressed(x[:8]), rtol=1e-5, atol=1e-5)
    ratios = th.profile(small).ratios(th.profile(model))
    assert ratios["params"] <= 0.3 and ratios["macs"] == 1.0  # zeros are still multiplied
    assert float(compressed.ratios(hard=True)["params"]) <= 0.3
    assert_unchanged(model, snapshot, config)
    assert technique.get_config() == th.Sparse().get_config()  # the user's object unchanged


def test_df_filters_and_sparse_stack_under_one_budget_to_int8_tflite(tmp_path):
    model = lenet5()
    budget = th.Budget(macs=0.3, params=0.2)
    compressed = th.hybrid_compress(
        model, budget, [th.DF(ranks=False), th.Sparse(sparsity=0.5)], search_steps=8
    )
    x = fit_search(compressed, epochs=4)
    small = th.strip(compressed)
    scale = np.abs(compressed(x[:8]).numpy()).max()
    np.testing.assert_allclose(small(x[:8]), compressed(x[:8]), atol=1e-5 * scale)
    ratios = th.profile(small).ratios(th.profile(model))
    assert ratios["macs"] <= 0.3 and ratios["params"] <= 0.2
    assert th.profile(small).layer("conv2").output_shape[-1] < 50  # channels removed
    assert all(0.5 <= share < 0.52 for share in _kernel_zeros(small).values())  # exactly
    report = th.export_tflite(
        small, tmp_path / "small.tflite", quantize="int8", representative_data=x, sparse=True
    )
    assert report.input_dtypes == ["int8"] and report.check["max_abs_diff"] < 0.5 * scale


def test_two_techniques_changing_one_layers_weights_are_refused():
    with pytest.raises(ValueError, match=r"'conv1' is claimed by two techniques: df \(rank\)"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), [th.DF(), th.Sparse(sparsity=0.5)])
    both = th.hybrid_compress(
        lenet5(),
        th.Budget(macs=0.5),
        [th.DF(skip=["conv1"]), th.Sparse(sparsity=0.5, layers=["conv1"])],
    )
    assert [la.name for la in th.DF().layers_of(both)] == ["channel_gates", "conv2", "fc1", "fc2"]


def test_sparse_options_and_their_errors():
    with pytest.raises(ValueError, match=r"Sparse\(sparsity=1.0\)"):
        th.Sparse(sparsity=1.0)
    with pytest.raises(ValueError, match="needs a params or bits budget"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), [th.Sparse()])
    with pytest.raises(ValueError, match=r"no layer to prune(.|\n)*conv1: .*XNNPack"):
        th.hybrid_compress(lenet5(), th.Budget(params=0.5), [th.Sparse(latency_on_xnnpack=True)])
    with pytest.raises(ValueError, match=r"twice"):
        th.hybrid_compress(lenet5(), th.Budget(params=0.5), [th.Sparse(), th.Sparse()])
    with pytest.raises(ValueError, match=r"give them to tfhybrid.DF"):
        th.hybrid_compress(lenet5(), th.Budget(params=0.5), [th.Sparse()], ranks=False)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_sparse_search_saves_loads_and_resumes(tmp_path, suffix):
    compressed = th.hybrid_compress(lenet5(), th.Budget(params=0.5), [th.Sparse()], search_steps=8)
    x = fit_search(compressed, epochs=1)
    path = str(tmp_path / f"sparse{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert [t.name for t in loaded.techniques] == ["sparse"]
    assert int(loaded.compression_step.numpy()) == 4
    np.testing.assert_allclose(loaded(x[:4]), compressed(x[:4]), rtol=1e-5, atol=1e-6)
    fit_search(loaded, epochs=1)
    assert loaded.search_finished()
    assert th.profile(th.strip(loaded)).ratios(th.profile(lenet5()))["params"] <= 0.5


def test_the_logger_writes_the_budget_ratios_and_each_kernels_sparsity(tmp_path):
    compressed = th.hybrid_compress(lenet5(), th.Budget(params=0.5), [th.Sparse()], search_steps=4)
    x, y = mnist_like(32)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [th.CompressionScheduler(), th.CompressionLogger(str(tmp_path))]
    compressed.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    tags = {
        value.tag: float(tf.make_ndarray(value.tensor))
        for path in tmp_path.glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert tags["compression/params_ratio"] <= 0.5 and "compression/bits_ratio" in tags
    assert tags["sparsity/fc1"] == pytest.approx(compressed.technique("sparse").sparsity, abs=0.01)


def test_the_constant_schedule_prunes_to_the_target_from_the_first_step():
    technique = th.Sparse(sparsity=0.6, schedule="constant", layers=["fc1"])
    compressed = th.hybrid_compress(lenet5(), th.Budget(params=0.9), [technique], search_steps=8)
    fit_search(compressed, epochs=1, n=16)  # 1 of the search's 8 steps
    (fc1,) = compressed.technique_layers()
    assert fc1.pruning_vars[0][1].numpy().mean() == pytest.approx(0.4, abs=0.01)
    with pytest.raises(ValueError, match=r"schedule='cubic'"):
        th.Sparse(schedule="cubic")


def test_a_budget_that_needs_over_99_percent_sparsity_is_met():
    model = lenet_300_100()
    compressed = th.hybrid_compress(model, th.Budget(params=0.01), [th.Sparse()])
    assert compressed.technique("sparse").sparsity > 0.99
    compressed.finish_search()
    assert float(compressed.ratios(hard=True)["params"]) == pytest.approx(0.01, abs=1e-5)
    measured = th.profile(th.strip(compressed)).nonzero_params / th.profile(model).params
    assert measured <= 0.01  # (less: profile does not count the zero biases)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_self_attentions_four_kernels_are_pruned_counted_and_saved(tmp_path, suffix):
    inputs = keras.Input((6, 12))
    x = keras.layers.Dense(12, name="embed")(inputs)
    x = keras.layers.MultiHeadAttention(3, 4, 5, name="attention")(x, x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.5), [th.Sparse(layers=["attention"])], search_steps=4
    )
    x = np.random.default_rng(12).normal(size=(8, 6, 12)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-5, atol=1e-6)
    compressed.compile("adam", "mse")
    y = np.zeros((8, 6, 4), np.float32)
    compressed.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    path = str(tmp_path / f"attention{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), compressed(x), rtol=1e-5, atol=1e-6)
    small = th.strip(compressed)
    attention = small.get_layer("attention")
    assert isinstance(attention, keras.layers.MultiHeadAttention)
    density = 1.0 - compressed.technique("sparse").sparsity
    logged = compressed.technique("sparse").scalars(compressed)["sparsity/attention"]
    assert logged == pytest.approx(1.0 - density, abs=0.01)  # over its four kernels
    for kernel in [w.numpy() for w in attention.weights if "kernel" in w.name]:
        assert np.mean(kernel != 0) == pytest.approx(density, abs=1 / kernel.size)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-5, atol=1e-6)
    counted, measured = compressed.ratios(hard=True), th.profile(small)
    original = th.profile(model)
    # (each kernel keeps floor(density * entries): up to one weight less than counted)
    share = measured.nonzero_params / original.params
    assert float(counted["params"]) == pytest.approx(share, abs=4 / original.params)
    assert share <= float(counted["params"]) <= 0.5


def test_a_bits_budget_sets_the_sparsity_and_strip_meets_it():
    """Bits fall with the kept share as params do, plus each pruned kernel's bitmap: at
    `bits=0.2` the derived sparsity is higher than at `params=0.2`, and both are met."""
    model = lenet5()
    original = th.profile(model)
    sparsities = {}
    for budget in (th.Budget(params=0.2), th.Budget(bits=0.2), th.Budget(params=0.3, bits=0.2)):
        compressed = th.hybrid_compress(model, budget, [th.Sparse()], search_steps=2)
        compressed.finish_search()
        small = th.profile(th.strip(compressed))
        sparsities[str(budget)] = compressed.technique("sparse").sparsity
        target = budget.targets()
        if "bits" in target:
            assert 0.19 < small.bits / (32 * original.params) <= 0.2  # zero biases store less
        if "params" in target:
            assert small.nonzero_params / original.params <= target["params"]
    by_params, by_bits, both = sparsities.values()
    assert by_bits > by_params and both == by_bits
