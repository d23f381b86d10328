"""techniques.unify and constraints: blocks of one magnitude (or zero), trained by ADMM."""

import itertools
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import constraints
from tfhybrid.blocks import (
    FREE,
    PRUNED,
    UNIFIED,
    BlockLayout,
    BlockShares,
    blocked_shape,
    kinds_of,
    magnitude_grid,
)
from tfhybrid.techniques import unify

from models import APPLICATIONS, fit_search, lenet5, mnist_like

keras = th.keras


@pytest.mark.parametrize(
    "shape,block",
    [((6, 8), (1, 4)), ((5, 7), (2, 2)), ((3, 3, 5, 6), (4, 1)), ((3, 3, 2, 3), "kernel")],
)
def test_blocks_cut_a_kernel_and_put_it_back_shorter_at_the_edges(shape, block):
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    layout = BlockLayout(shape, block)
    blocks = layout.blocks(kernel).numpy()
    assert blocks.shape == (layout.count, layout.size)
    np.testing.assert_array_equal(layout.kernel(blocks).numpy(), kernel)
    # Padding is zero and never a real weight: the valid entries hold the whole kernel.
    valid = layout.valid.numpy()
    assert valid.sum() == kernel.size and np.all(blocks[valid == 0] == 0)


def test_a_1x4_block_spans_four_outputs_of_one_input():
    kernel = np.arange(16, dtype=np.float32).reshape(2, 8)
    blocks = BlockLayout(kernel.shape, (1, 4)).blocks(kernel).numpy()
    np.testing.assert_array_equal(blocks[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(blocks[1], [4, 5, 6, 7])
    np.testing.assert_array_equal(blocks[2], [8, 9, 10, 11])


def test_the_projection_unifies_and_prunes_the_blocks_it_costs_least_to():
    kernel = np.array(
        [[0.1, -0.1, 0.1, 0.1], [1.0, -3.0, 0.5, 2.0], [0.01, 0.02, -0.01, 0.0]], np.float32
    ).reshape(3, 4)
    layout = BlockLayout(kernel.shape, (1, 4))
    projected, kinds = unify.project(kernel, layout, unify=1 / 3, prune=1 / 3)
    np.testing.assert_array_equal(kinds, [UNIFIED, FREE, PRUNED])
    # The closest unified block: each weight's sign times the block's mean magnitude.
    np.testing.assert_allclose(projected[0], [0.1, -0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(projected[1], kernel[1])
    np.testing.assert_array_equal(projected[2], 0.0)


def test_a_block_of_one_weight_is_never_unified_and_is_stored_free():
    # 5 outputs in blocks of 4: each row ends in a block of one weight, which would store
    # a magnitude and a sign (33 bits) instead of its 32.
    kernel = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
    layout = BlockLayout(kernel.shape, (1, 4))
    _, kinds = unify.project(kernel, layout, unify=0.5, prune=0.0)
    np.testing.assert_array_equal(kinds, [UNIFIED, FREE, UNIFIED, FREE])
    assert list(kinds_of(kernel, layout)) == [FREE] * 4  # a lone weight reads as free


def test_unifying_alone_is_the_exact_projection():
    kernel = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    layout = BlockLayout(kernel.shape, (1, 4))
    projected, _ = unify.project(kernel, layout, unify=0.5, prune=0.0)
    best = np.inf
    for chosen in itertools.combinations(range(6), 3):
        candidate = kernel.copy()
        for row in chosen:
            candidate[row] = np.where(kernel[row] >= 0, 1, -1) * np.abs(kernel[row]).mean()
        best = min(best, np.sum((candidate - kernel) ** 2))
    np.testing.assert_allclose(np.sum((projected.numpy() - kernel) ** 2), best, rtol=1e-5)


def test_admm_updates_z_to_the_projection_and_gathers_the_gap_in_u():
    w = tf.constant([1.0, -2.0, 3.0])
    z, u = tf.Variable(tf.zeros(3)), tf.Variable([0.5, 0.0, -1.0])
    constraints.admm_update(w, z, u, lambda t: tf.clip_by_value(t, -1.0, 1.0))
    np.testing.assert_allclose(z, [1.0, -1.0, 1.0])
    np.testing.assert_allclose(u, [0.5, -1.0, 1.0])  # u + w - z
    penalty = constraints.admm_penalty(w, z, u, tf.constant(2.0))
    np.testing.assert_allclose(penalty, 0.5 * 2.0 * np.sum((w - z + u) ** 2))


def test_block_storage_counts_a_magnitude_and_signs_per_unified_block():
    # Blocks of 4: half unified (1 + 32/4 bits per weight), a quarter pruned (0), a quarter
    # float32, and 2 bits per block to say which.
    layout = BlockLayout((8, 4), (1, 4))
    assert BlockShares.planned(layout, 0.5, 0.25).bits_per_entry() == 32 * 0.25 + 4.5 + 2 / 4
    assert BlockShares.planned(layout, 1.0, 0.0).bits_per_entry() == 1 + 8  # one kind: no code
    # 8-bit magnitudes: 1 + 8/4 bits per weight, and the kernel's float32 step (32 entries).
    assert BlockShares.planned(layout, 1.0, 0.0, 8).bits_per_entry() == 1 + 2 + 32 / 32
    kinds = np.array([UNIFIED, UNIFIED, PRUNED, FREE, FREE, FREE, FREE, FREE])
    assert BlockShares.measured(layout, kinds) == BlockShares.planned(layout, 0.25, 0.125)
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(bits=0.5), [th.Unify(unify=0.5, prune=0.25)])
    layers = [model.get_layer(n) for n in ("conv1", "conv2", "fc1", "fc2")]
    kernels = sum(la.kernel.shape.num_elements() for la in layers)
    others = model.count_params() - kernels
    # conv2's 50 and fc2's 10 outputs end in blocks of 2: codes and magnitudes are per block.
    expected = 32 * others
    for la in layers:
        entries, count = la.kernel.shape.num_elements(), BlockLayout(la.kernel.shape, (1, 4)).count
        # A quarter free, half signed, 2-bit codes, 8-bit magnitudes, the step.
        expected += entries * (32 * 0.25 + 0.5) + count * (2 + 8 * 0.5) + 32
    assert float(compressed.ratios(hard=True)["bits"]) == pytest.approx(
        expected / (32 * model.count_params())
    )
    pruned = 0.25 * kernels
    assert float(compressed.ratios(hard=True)["params"]) == pytest.approx(
        1 - pruned / model.count_params()
    )


def test_with_no_free_block_the_kinds_code_is_one_bit_whatever_the_rounding():
    # fc2 of LeNet-5 in blocks of 4: 1,000 blocks of 4 weights and 500 of 2; shares that do
    # not add up to 1 exactly in float32 once counted as a third kind (2-bit codes).
    layout = BlockLayout((500, 10), (1, 4))
    kinds = np.random.default_rng(8).choice([UNIFIED, PRUNED], layout.count, p=[0.37, 0.63])
    kept = layout.valid.numpy().sum(1)  # float32, as a wrapper's kept weights are
    shares = BlockShares.measured(layout, kinds, kept)
    unified = kinds == UNIFIED
    expected = layout.count * 1 + kept[unified].sum() + 32 * unified.sum()
    assert shares.bits_per_entry() * 5000 == pytest.approx(expected, abs=1e-3)


def test_a_unified_model_strips_to_the_same_function_with_unified_and_pruned_blocks():
    model = lenet5()
    compressed = th.hybrid_compress(
        model, th.Budget(bits=0.5), [th.Unify(block=(1, 4), unify=0.5, prune=0.25)]
    )
    x = fit_search(compressed, epochs=2)
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x[:8]), compressed(x[:8]), rtol=1e-5, atol=1e-6)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        kernel = small.get_layer(name).kernel.numpy()
        layout = BlockLayout(kernel.shape, (1, 4))
        blocks = layout.blocks(kernel).numpy()
        # conv2's 50 outputs end in a block of 2 (padded with zeros that are not weights).
        magnitudes = np.where(layout.valid.numpy() > 0, np.abs(blocks), np.abs(blocks[:, :1]))
        pruned = np.all(blocks == 0, 1)
        unified = np.all(np.isclose(magnitudes, magnitudes[:, :1], rtol=1e-5), 1) & ~pruned
        want_unified, want_pruned = layout.block_counts(0.5, 0.25)
        assert pruned.sum() >= want_pruned
        assert unified.sum() + pruned.sum() >= want_unified + want_pruned
    assert model.get_layer("fc1").kernel.numpy().std() > 0  # the input model is untouched
    ratios = th.profile(small).ratios(th.profile(model))
    assert ratios["macs"] == 1.0 and ratios["params"] <= 0.76
    # Measured in the block format, the storage is what the budget counted.
    promised = float(compressed.ratios(hard=True)["bits"])
    measured = th.profile(small, block=(1, 4)).ratios(th.profile(model))["bits"]
    assert measured <= promised <= 0.5 and ratios["bits"] > 1.5 * promised


@pytest.mark.parametrize("magnitude_bits", [8, 32])
def test_fine_tuning_trains_one_magnitude_per_unified_block(magnitude_bits):
    compressed = th.hybrid_compress(
        lenet5(),
        th.Budget(bits=0.5),
        [th.Unify(unify=0.75, prune=0.0, magnitude_bits=magnitude_bits)],
        search_steps=4,
    )
    wrapper = compressed.get_layer("unify_fc1")
    unified = wrapper.kinds.numpy() == UNIFIED

    def magnitudes() -> np.ndarray:
        blocks = wrapper.layout.blocks(wrapper.effective_kernel()).numpy()[unified]
        np.testing.assert_array_equal(np.abs(blocks), np.abs(blocks[:, :1]) * np.ones(4))
        return np.abs(blocks[:, 0])

    fit_search(compressed, epochs=1)  # the 4 steps of search
    unified = wrapper.kinds.numpy() == UNIFIED
    decided = magnitudes()
    fit_search(compressed, epochs=3)  # 12 of fine-tuning
    tuned = magnitudes()
    assert np.mean(tuned != decided) > 0.5  # they train (through the rounding, if any)
    if magnitude_bits < 32:  # whole steps of the largest / 256
        step = tuned.max() / 2**magnitude_bits
        np.testing.assert_array_equal(np.round(tuned / step) * step, tuned)
        assert magnitude_grid(tuned) == (magnitude_bits, step)
    else:
        assert magnitude_grid(tuned)[0] == 32


def test_the_unified_share_follows_a_bits_budget():
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(bits=0.3), [th.Unify(unify=None, prune=0.3)])
    technique = compressed.technique("unify")
    assert 0 < technique.unify < 1
    assert float(compressed.ratios(hard=True)["bits"]) == pytest.approx(0.3, abs=1e-6)
    # The projection prunes the short blocks at the edges first, which leaves more free
    # weights than planned; the search's end unifies more blocks until the budget holds.
    fit_search(compressed, epochs=2)
    measured = th.profile(th.strip(compressed), block=(1, 4)).ratios(th.profile(model))
    assert measured["bits"] <= float(compressed.ratios(hard=True)["bits"]) <= 0.3


@pytest.mark.parametrize(
    "unify,prune", [(None, 0.5), (0.2, None), (None, None)], ids=["unify", "prune", "both"]
)
def test_the_share_left_none_follows_the_bits_budget(unify, prune):
    compressed = th.hybrid_compress(
        lenet5(), th.Budget(bits=0.05), [th.Unify(block=(1, 8), unify=unify, prune=prune)]
    )
    technique = compressed.technique("unify")
    assert float(compressed.ratios(hard=True)["bits"]) == pytest.approx(0.05, abs=1e-6)
    given = {"unify": unify, "prune": prune}
    for option, share in given.items():
        if share is not None:
            assert getattr(technique, option) == share  # the given share stays
    if unify is None and prune is None:  # unifying all is not enough: no free block left
        assert technique.unify + technique.prune == pytest.approx(1.0)
    # After the search the kernels, measured, still meet it (blocks at the edges included).
    fit_search(compressed, epochs=2)
    measured = th.profile(th.strip(compressed), block=(1, 8)).ratios(th.profile(lenet5()))
    assert measured["bits"] <= float(compressed.ratios(hard=True)["bits"]) <= 0.05


def test_with_both_shares_none_blocks_are_unified_first_then_pruned():
    def shares(bits: float) -> tuple[float, float]:
        technique = th.Unify(block=(1, 8), unify=None, prune=None)
        compressed = th.hybrid_compress(lenet5(), th.Budget(bits=bits), [technique])
        assert float(compressed.ratios(hard=True)["bits"]) == pytest.approx(bits, abs=1e-6)
        return compressed.technique("unify").unify, compressed.technique("unify").prune

    # Every 1 x 8 block unified stores 2 bits per weight (0.0625 of float32) and some more.
    unify, prune = shares(0.2)
    assert 0 < unify < 1 and prune == 0  # room for free blocks
    unify, prune = shares(0.04)
    assert 0 < prune < 1 and unify + prune == pytest.approx(1.0)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_model_saved_mid_admm_resumes_with_its_z_and_u(tmp_path, suffix):
    compressed = th.hybrid_compress(
        lenet5(), th.Budget(bits=0.5), [th.Unify(unify=0.5, update_every=1)], search_steps=20
    )
    fit_search(compressed, epochs=1)  # 4 of 20 steps
    distances = compressed.technique("unify").scalars(compressed)
    assert sorted(distances) == [f"unify/distance/{n}" for n in ("conv1", "conv2", "fc1", "fc2")]
    assert all(0 < d < 1 for d in distances.values())  # W nears Z, which U corrects
    wrapper = compressed.get_layer("unify_fc2")
    z, u = wrapper.z.numpy(), wrapper.u.numpy()
    assert np.abs(u).max() > 0
    path = str(tmp_path / f"mid{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    restored = loaded.get_layer("unify_fc2")
    np.testing.assert_array_equal(restored.z.numpy(), z)
    np.testing.assert_array_equal(restored.u.numpy(), u)
    assert int(restored.step.numpy()) == 4 and not loaded.search_finished()
    x, y = mnist_like(64)
    loaded.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[th.CompressionScheduler()])
    assert loaded.search_finished()
    np.testing.assert_allclose(th.strip(loaded)(x[:4]), loaded(x[:4]), rtol=1e-5, atol=1e-6)


def _df_and_unify_on_lenet5(seed: int) -> tuple:
    """(LeNet-5, its DF + Unify search model fitted through a 4-step search under
    Budget(macs=0.3, bits=0.1), the stripped model)."""
    keras.utils.set_random_seed(seed)
    model = lenet5()
    compressed = th.hybrid_compress(
        model,
        th.Budget(macs=0.3, bits=0.1),
        [th.DF(ranks=False), th.Unify(unify=None, prune=None)],
        search_steps=4,
    )
    fit_search(compressed, epochs=2)
    return model, compressed, th.strip(compressed)


def test_df_channels_and_unify_stack_under_macs_and_bits_and_store_as_counted(tmp_path):
    model, compressed, small = _df_and_unify_on_lenet5(seed=0)
    x = mnist_like(8)[0]
    scale = np.abs(compressed(x).numpy()).max()
    np.testing.assert_allclose(small(x), compressed(x), atol=1e-5 * scale)
    assert th.profile(small).ratios(th.profile(model))["macs"] <= 0.3
    # The blocks lie over the channels DF keeps, so the stripped kernels' own blocks are
    # unified or pruned as counted (to 0.5%: see the test below).
    counted = float(compressed.ratios(hard=True)["bits"])
    measured = th.profile(small, block=(1, 4))
    share = measured.ratios(th.profile(model))["bits"]
    assert share <= 0.1 and share == pytest.approx(counted, rel=5e-3)
    report = th.save_compact(small, str(tmp_path / "m.thc"), block=(1, 4))
    assert report.counted_bits == measured.bits


@pytest.mark.xfail(reason="on 2 of seeds 0-11 the count is below the measured bits by 6e-4")
def test_df_and_unify_count_no_fewer_bits_than_the_stripped_model_stores():
    model, compressed, small = _df_and_unify_on_lenet5(seed=4)
    measured = th.profile(small, block=(1, 4)).ratios(th.profile(model))["bits"]
    assert measured <= float(compressed.ratios(hard=True)["bits"])  # 0.0960186 > 0.0959638


def test_layers_unify_cannot_take_are_named():
    inputs = keras.Input((8, 8, 4))
    hidden = keras.layers.SeparableConv2D(4, 3, name="separable")(inputs)
    hidden = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(hidden)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="separable: Unify takes Dense, Conv2D and Depthwise") as w:
        compressed = th.hybrid_compress(model, th.Budget(bits=0.9), [th.Unify()])
    assert (
        "grouped: Unify takes Dense, Conv2D and DepthwiseConv2D kernels, not a Conv2D (grouped)"
        in str(w[0].message)
    )
    assert [w.layer.name for w in compressed.technique("unify").layers_of(compressed)] == ["head"]
    with pytest.warns(UserWarning, match="fc1: block='kernel' needs a kernel with k x k"):
        th.hybrid_compress(lenet5(), th.Budget(bits=0.9), [th.Unify(block="kernel")])
    with pytest.raises(ValueError, match="Unify finds no layer"):
        th.hybrid_compress(model, th.Budget(bits=0.9), [th.Unify(layers=["separable"])])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"block": (1, 1)}, "at least two weights"),
        ({"block": (0, 4)}, "at least two weights"),
        ({"block": "row"}, "at least two weights"),
        ({"unify": 1.5}, r"unify=1.5\): give a share"),
        ({"prune": -0.1}, r"prune=-0.1\): give a share"),
        ({"unify": 0.8, "prune": 0.4}, "add up to at most 1"),
        ({"rho": (0.0, 1.0)}, "both > 0"),
        ({"magnitude_bits": 0}, r"magnitude_bits=0\): give 1 to 16 bits"),
        ({"magnitude_bits": 24}, r"magnitude_bits=24\): give 1 to 16 bits"),
    ],
)
def test_bad_unify_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        th.Unify(**options)


def test_budgets_unify_cannot_derive_or_reach_are_refused():
    with pytest.raises(ValueError, match="derives the shares left None from a bits budget"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), [th.Unify(unify=None)])
    with pytest.raises(ValueError, match=r"cannot be met by Unify\(block=\(1, 4\)\) alone"):
        th.hybrid_compress(lenet5(), th.Budget(bits=0.01), [th.Unify(unify=None)])
    with pytest.raises(ValueError, match="with every block that may be unified so"):
        th.hybrid_compress(lenet5(), th.Budget(bits=0.05), [th.Unify(unify=None, prune=0.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.Unify(block="kernel")  # a valid block


def test_the_layers_of_a_nested_model_are_unified_and_strip_exactly():
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="inner_dense")],
        name="backbone",
    )
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(4, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    compressed = th.hybrid_compress(
        model, th.Budget(bits=0.9), [th.Unify(unify=0.5, layers=["backbone"])], search_steps=2
    )
    names = [w.layer.name for w in compressed.technique("unify").layers_of(compressed)]
    assert names == ["inner_dense"]
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, 32)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compressed.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    small = th.strip(compressed)
    np.testing.assert_allclose(small(x), compressed(x), rtol=1e-5, atol=1e-6)
    kernel = small.get_layer("inner_dense").kernel.numpy()
    kinds = kinds_of(kernel, BlockLayout(kernel.shape, (1, 4)))
    assert np.sum(kinds == UNIFIED) == 16  # half of the 32 blocks


def test_a_derived_share_is_derived_again_from_the_room_the_channels_leave():
    compressed = th.hybrid_compress(
        lenet5(),
        th.Budget(macs=0.5, bits=0.3),
        [th.DF(ranks=False), th.Unify(unify=None, prune=0.0)],
        search_steps=4,
    )
    technique = compressed.technique("unify")
    at_setup = technique.unify  # with every other layer whole
    fit_search(compressed, epochs=2)
    # DF removed channels, so fewer blocks need unifying to meet the same bits.
    assert technique.unify < at_setup and technique.derived == ["unify"]
    # Planned over blocks of average size; the projection's choice of blocks ends a little
    # under the budget.
    assert 0.27 < float(compressed.ratios(hard=True)["bits"]) <= 0.3
    wrapper = compressed.get_layer("unify_fc1")
    assert wrapper.unify == technique.unify


def test_a_depthwise_kernel_is_counted_and_cut_across_its_channels():
    inputs = keras.Input((6, 6, 8))
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")
    model = keras.Model(inputs, depthwise(inputs))
    compressed = th.hybrid_compress(
        model, th.Budget(bits=0.9), [th.Unify(unify=0.5, prune=0.25, magnitude_bits=32)]
    )
    wrapper = compressed.get_layer("unify_depthwise")
    # (3, 3, 8, 2) as (3, 3, 1, 16): 9 positions x 4 blocks of 4 output channels.
    assert wrapper.layout.shape == (3, 3, 1, 16) and wrapper.layout.count == 36
    # A quarter float32, half signed with a magnitude per block, 2-bit codes; 16 biases.
    kernel_bits = 144 * (32 * 0.25 + 0.5) + 36 * (2 + 32 * 0.5)
    expected = (kernel_bits + 32 * 16) / (32 * model.count_params())
    assert float(compressed.ratios(hard=True)["bits"]) == pytest.approx(expected)
    assert float(compressed.ratios(hard=True)["params"]) == pytest.approx(1 - 36 / 160)


def test_df_and_unify_stack_on_mobilenet_v2_with_its_depthwise_kernels(tmp_path):
    model = APPLICATIONS["MobileNetV2"]()
    compressed = th.hybrid_compress(
        model,
        th.Budget(macs=0.6, bits=0.2),
        [th.DF(ranks=False), th.Unify(unify=None, prune=None)],
        search_steps=2,
    )
    wrapped = {w.layer.name for w in compressed.technique("unify").layers_of(compressed)}
    assert "block_1_depthwise" in wrapped and "Conv1" in wrapped
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8) % 10
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compressed.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[th.CompressionScheduler()])
    small = th.strip(compressed)
    scale = np.abs(compressed(x).numpy()).max()
    np.testing.assert_allclose(small(x), compressed(x), atol=1e-4 * scale)
    depthwise = small.get_layer("block_1_depthwise")
    layout = BlockLayout(blocked_shape(depthwise), (1, 4))
    kernel = depthwise.depthwise_kernel.numpy().reshape(layout.shape)
    assert np.sum(kinds_of(kernel, layout) != FREE) > 0
    counted = float(compressed.ratios(hard=True)["bits"])
    report = th.save_compact(small, str(tmp_path / "m.thc"), block=(1, 4))
    assert report.counted_bits == th.profile(small, block=(1, 4)).bits
    promised = counted * 32 * model.count_params()  # BatchNorm tensors still at their
    assert 0.98 * promised < report.counted_bits < 1.002 * promised  # start store cheaper
    loaded = th.load_compact(str(tmp_path / "m.thc"))
    for original, restored in zip(small.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(restored, original)
