"""techniques.lc: the learning-compression algorithm inside fit, its state and its costs."""

import math

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid.techniques import compressions, lc

from models import assert_unchanged, fit_search, lenet5, lenet_300_100, mnist_like, weights_snapshot

keras = th.keras
layers = keras.layers


def _wrappers(compressed) -> dict:
    return {w.layer.name: w for w in compressed.technique("lc").layers_of(compressed)}


def test_it_starts_at_direct_compression_and_computes_the_original_function():
    model = lenet_300_100()
    snapshot, config = weights_snapshot(model), model.get_config()
    parts = {"fc1": th.Quantize(2), ("fc2", "fc3"): th.Prune(keep=0.2)}
    compressed = th.hybrid_compress(model, th.Budget(bits=0.5), [th.LC(parts)], search_steps=8)
    x = mnist_like(8)[0]
    np.testing.assert_allclose(compressed(x), model(x), rtol=1e-5, atol=1e-6)
    wrappers = _wrappers(compressed)
    kernel = model.get_layer("fc1").kernel.numpy()
    direct = th.Quantize(2).project([kernel]).values[0]
    np.testing.assert_allclose(wrappers["fc1"].target.numpy(), direct, rtol=1e-6)
    joint = [model.get_layer(n).kernel.numpy() for n in ("fc2", "fc3")]
    kept = [np.count_nonzero(wrappers[n].target.numpy()) for n in ("fc2", "fc3")]
    assert sum(kept) == math.floor(0.2 * sum(k.size for k in joint))  # one budget for both
    assert all(np.all(w.multipliers.numpy() == 0) for w in wrappers.values())
    assert_unchanged(model, snapshot, config)


def test_a_search_ends_with_the_compressed_kernels_which_strip_keeps(tmp_path):
    model = lenet_300_100()
    parts = {"fc1": th.Quantize(2) + th.Prune(keep=0.01), ("fc2", "fc3"): th.Quantize(4)}
    compressed = th.hybrid_compress(model, th.Budget(bits=0.1), [th.LC(parts)], search_steps=8)
    x = fit_search(compressed, epochs=1)  # 4 steps: a C step, then half the search
    wrappers = _wrappers(compressed)
    mu = float(wrappers["fc1"].mu(wrappers["fc1"].step))
    kernel, target = wrappers["fc1"].kernel.numpy(), wrappers["fc1"].target.numpy()
    expected = -mu * (kernel - target)  # lambda after its first update, from 0
    np.testing.assert_allclose(wrappers["fc1"].multipliers.numpy(), expected, atol=1e-7)
    figures = compressed.technique("lc").scalars(compressed)
    assert 0 < figures["lc/distance/fc1"] < 1 and figures["lc/mu"] == pytest.approx(mu)
    fit_search(compressed, epochs=2)
    assert compressed.search_finished()
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-5, atol=1e-5)
    assert isinstance(small.get_layer("fc1"), layers.Add)  # the sum of its parts, apart:
    fc1 = small.get_layer("fc1_part0").kernel.numpy()  # a codebook of two values ...
    assert len(np.unique(fc1)) == 2 and small.get_layer("fc1_part0").use_bias
    floats = small.get_layer("fc1_part1").kernel.numpy()  # ... and 1% of floats
    assert np.count_nonzero(floats) == math.floor(0.01 * fc1.size)
    assert not small.get_layer("fc1_part1").use_bias
    joint = np.concatenate([small.get_layer(n).kernel.numpy().ravel() for n in ("fc2", "fc3")])
    assert len(np.unique(joint)) == 4  # one codebook for both layers
    stored = compressed.decisions(hard=True).stored
    n1, n23 = fc1.size, joint.size
    assert float(stored["fc1"][1]) == n1 + 2 * 32 + 32 * math.floor(0.01 * n1) + n1
    assert float(stored["fc2"][1] + stored["fc3"][1]) == pytest.approx(2 * n23 + 4 * 32)
    biases = sum(model.get_layer(n).bias.shape[0] for n in ("fc1", "fc2", "fc3"))
    bits = n1 * 2 + 64 + 32 * math.floor(0.01 * n1) + 2 * n23 + 128 + 32 * biases
    counted = compressed.ratios(hard=True)["bits"]
    assert float(counted) == pytest.approx(bits / (32 * model.count_params()))
    measured = th.profile(small).bits  # stored as counted, but fc3 stores the codebook again
    assert bits <= measured <= bits + 4 * 32
    report = th.save_compact(small, str(tmp_path / "lc.thc"), block=None)
    assert report.counted_bits == measured  # written as measured, restored exactly:
    assert (
        report.encodings["fc1_part0/0"] == "table" and report.encodings["fc1_part1/0"] == "sparse"
    )
    loaded = th.load_compact(str(tmp_path / "lc.thc"))
    for original, restored in zip(small.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(restored, original)
    np.testing.assert_array_equal(loaded(x), small(x))


def test_a_low_rank_part_strips_as_a_factor_pair_beside_the_others():
    model = lenet_300_100()
    technique = th.LC({"fc2": th.Binarize() + th.LowRank(2)})
    compressed = th.hybrid_compress(model, th.Budget(bits=0.9), [technique], search_steps=1)
    compressed.finish_search()
    small = th.strip(compressed)
    assert small.get_layer("fc2_part1_in").kernel.shape == (300, 2)
    assert small.get_layer("fc2_part1_out").kernel.shape == (2, 100)
    assert len(np.unique(np.abs(small.get_layer("fc2_part0").kernel.numpy()))) == 1
    x = mnist_like(8)[0]
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    counted = float(compressed.decisions(hard=True).stored["fc2"][1])
    assert counted == 300 * 100 + 32 + 32 * 2 * (300 + 100)  # signs, a scale, two factors


def test_a_low_rank_kernel_strips_as_the_factor_pair_it_is_counted_as():
    model = lenet_300_100()
    technique = th.LC({"fc1": th.LowRank(12), "fc2": th.LowRank(alpha=1.5e-7)})  # at mu = 1e-4
    compressed = th.hybrid_compress(model, th.Budget(bits=0.9), [technique], search_steps=1)
    compressed.finish_search()
    small = th.strip(compressed)
    assert small.get_layer("fc1_u").kernel.shape == (784, 12)
    rank = small.get_layer("fc2_u").kernel.shape[-1]
    assert 1 <= rank < 75  # where two factors store less than the kernel
    x = mnist_like(8)[0]
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    stored = compressed.decisions(hard=True).stored
    assert float(stored["fc1"][1]) == 32 * 12 * (784 + 300)
    assert float(stored["fc2"][1]) == 32 * rank * (300 + 100)
    counted = float(compressed.ratios(hard=True)["bits"]) * 32 * model.count_params()
    biases = 300 + 100 + 10  # still zero: the cost model counts 32 bits each, profile a bitmap
    assert th.profile(small).bits == pytest.approx(counted - 31 * biases)


def test_stacked_with_df_its_last_c_step_counts_the_kept_channels_the_file_stores():
    model = lenet_300_100()
    techniques = [th.DF(ranks=False), th.LC({"fc2": th.Quantize(2) + th.Prune(keep=0.05)})]
    compressed = th.hybrid_compress(model, th.Budget(macs=0.3), techniques, search_steps=8)
    x = fit_search(compressed, epochs=3)
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    quantized = small.get_layer("fc2_part0").kernel.numpy()
    rows, cols = quantized.shape
    assert rows < 300 and cols < 100  # DF removed channels on both sides of fc2
    assert len(np.unique(quantized)) == 2
    corrections = np.count_nonzero(small.get_layer("fc2_part1").kernel.numpy())
    assert corrections == math.floor(0.05 * rows * cols)  # 5% of the kept weights
    counted = float(compressed.ratios(hard=True)["bits"]) * 32 * model.count_params()
    assert th.profile(small).bits == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_search_saves_loads_and_resumes(tmp_path, suffix):
    parts = {("conv2", "fc2"): th.Quantize(3) + th.Prune(keep=0.02)}
    compressed = th.hybrid_compress(lenet5(), th.Budget(bits=0.2), [th.LC(parts)], search_steps=8)
    x = fit_search(compressed, epochs=1)
    path = str(tmp_path / f"lc{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.compression_step.numpy()) == 4
    before, after = _wrappers(compressed), _wrappers(loaded)
    for name in ("conv2", "fc2"):
        for attribute in ("target", "multipliers", "counted", "part_values"):
            a, b = getattr(before[name], attribute), getattr(after[name], attribute)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(loaded.technique("lc").parts[("conv2", "fc2")], compressions.Additive)
    np.testing.assert_allclose(loaded(x[:4]), compressed(x[:4]), rtol=1e-5, atol=1e-6)
    fit_search(loaded, epochs=1)
    assert loaded.search_finished()
    np.testing.assert_allclose(th.strip(loaded)(x[:4]), loaded(x[:4]), rtol=1e-5, atol=1e-5)


def test_the_cost_model_counts_a_stored_kernel_as_given():
    inputs = keras.Input((20,))
    model = keras.Model(inputs, layers.Dense(30, name="fc")(inputs))
    compressed = th.hybrid_compress(model, th.Budget(bits=0.5), [th.LC({"fc": th.Binarize()})])
    costs = compressed.cost_model.costs(stored={"fc": (600, 632)})
    assert costs == {"macs": 600, "params": 630, "bits": 632 + 30 * 32}
    stored = compressed.decisions(hard=True).stored["fc"]
    assert [float(v) for v in stored] == [600, 600 + 32]  # a sign bit each and one scale


def test_bad_input_gets_a_clear_error_and_leaves_the_model_alone():
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    budget = th.Budget(bits=0.5)
    with pytest.raises(ValueError, match=r"LC\(parts=\{\}\)"):
        th.LC({})
    with pytest.raises(ValueError, match=r"layer 'fc1' is in two parts"):
        th.LC({"fc1": th.Quantize(2), ("fc1", "fc2"): th.Quantize(2)})
    with pytest.raises(ValueError, match=r"'fc1' -> 2: give a layer name"):
        th.LC({"fc1": 2})
    with pytest.raises(ValueError, match=r"mu=\(0.1, 0.01\).*needs μ to rise"):
        th.LC({"fc1": th.Quantize(2)}, mu=(0.1, 0.01))
    with pytest.raises(ValueError, match=r"names 'fc9' \(did you mean"):
        th.hybrid_compress(model, budget, [th.LC({"fc9": th.Quantize(2)})])
    with pytest.raises(ValueError, match=r"names layer 'fc2', which .* leave out"):
        th.hybrid_compress(model, budget, [th.LC({"fc2": th.Quantize(2)})], skip=["fc2"])
    with pytest.raises(ValueError, match=r"layer 'flatten' \(Flatten\) has no Dense, Conv"):
        th.hybrid_compress(model, budget, [th.LC({"flatten": th.Quantize(2)})])
    with pytest.raises(ValueError, match=r"LowRank\(20\) for layer 'fc2'.*500 x 10 matrix"):
        th.hybrid_compress(model, budget, [th.LC({"fc2": th.Quantize(2) + th.LowRank(20)})])
    assert_unchanged(model, snapshot, config)


def test_each_compression_round_trips_through_its_config():
    summed = th.Ternarize(scaled=False) + th.Prune(norm="l1", penalty=0.1) + th.LowRank(alpha=1.0)
    technique = th.LC({("a", "b"): summed, "c": th.Binarize()}, mu=(1e-3, 1.0))
    again = lc.LC.from_config(technique.get_config())
    assert again.get_config() == technique.get_config()
    assert [type(p).__name__ for p in again.parts[("a", "b")].parts] == [
        "Ternarize",
        "Prune",
        "LowRank",
    ]
