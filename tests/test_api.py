"""The user's path: hybrid_compress -> fit with the scheduler -> strip; saving; errors."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import surgery
from tfhybrid.techniques import df

from models import (
    APPLICATIONS,
    MODERN,
    assert_unchanged,
    lenet5,
    lenet_300_100,
    nested_model,
    randomize_batchnorm,
    small_vit,
    weights_snapshot,
)

keras = th.keras
layers = keras.layers


def _data(model, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.input_shape[1:])).astype(np.float32)
    return x, rng.integers(0, model.output_shape[-1], n)


def _fit(compressed, x, y, epochs, batch_size=16):
    compressed.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return compressed.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[th.CompressionScheduler()],
    )


def _assert_strip_is_exact(compressed, small, x):
    expected = compressed(x, training=False).numpy()
    got = small(x, training=False).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert not any(isinstance(la, (df.ChannelGates, df._Factored)) for la in small.layers)


def test_lenet_path_meets_the_budget_and_logs_ratios():
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    x, y = _data(model, 128)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.1), search_steps=16)
    history = _fit(compressed, x, y, epochs=3)  # 8 steps/epoch: search, then fine-tune
    assert compressed.search_finished()
    ratios = history.history["macs_ratio"]
    assert ratios[0] > 0.1 >= ratios[-1] and "params_ratio" in history.history
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.1 * th.profile(model).macs
    assert th.profile(small).macs / th.profile(model).macs == pytest.approx(ratios[-1])
    evaluated = compressed.evaluate(x, y, verbose=0, return_dict=True)
    assert evaluated["macs_ratio"] == pytest.approx(ratios[-1])
    eager = compressed.compute_metrics(x[:8], y[:8], compressed(x[:8]), None)  # recounts
    assert float(eager["macs_ratio"]) == pytest.approx(ratios[-1])
    _assert_strip_is_exact(compressed, small, x[:8])
    assert_unchanged(model, snapshot, config)


@pytest.mark.parametrize(
    "name",
    [
        "MobileNetV2",
        # DenseNet121 (150 s on 2 cores), ResNet50 and EfficientNetB0 (about 55 s each;
        # test_surgery prunes and strips all three exactly) and the modern families (60-85 s
        # each) run under -m slow
        *(
            pytest.param(name, marks=pytest.mark.slow)
            for name in ("DenseNet121", "ResNet50", "EfficientNetB0", *MODERN)
        ),
    ],
)
def test_short_search_on_the_zoo_strips_exactly_within_budget(name):
    model = randomize_batchnorm({**APPLICATIONS, **MODERN}[name]())
    x, y = _data(model, 8)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), search_steps=2)
    _fit(compressed, x, y, epochs=2, batch_size=4)
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.5 * th.profile(model).macs
    _assert_strip_is_exact(compressed, small, x[:2])


def test_a_nested_backbone_named_in_layers_meets_the_budget_and_strips_exactly():
    """Transfer learning's shape: an application model called as one layer, a new head."""
    backbone = randomize_batchnorm(
        keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
        )
    )
    inputs = keras.Input((32, 32, 3))
    features = layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, layers.Dense(10, name="head")(features))
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), layers=[backbone.name])
    assert "head" not in {la.name for la in df.factored_layers_of(compressed)}
    compressed.finish_search()  # the projection alone takes the backbone to the budget
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.5 * th.profile(model).macs
    _assert_strip_is_exact(compressed, small, _data(model, 2)[0])


@pytest.mark.parametrize("filters,ranks,kind", [(True, False, "gates"), (False, True, "ranks")])
def test_filters_only_and_ranks_only_use_the_same_path(filters, ranks, kind):
    model = lenet5()
    x, y = _data(model, 64)
    compressed = th.hybrid_compress(
        model, th.Budget(params=0.3), filters=filters, ranks=ranks, search_steps=4, round_to=2
    )
    assert (df.gates_of(compressed) is not None) == filters
    assert bool(df.factored_layers_of(compressed)) == ranks
    _fit(compressed, x, y, epochs=2)
    small = th.strip(compressed)
    assert th.profile(small).params <= 0.3 * th.profile(model).params
    _assert_strip_is_exact(compressed, small, x[:8])
    if kind == "ranks":
        assert [la.name for la in small.layers if la.name.endswith("_u")]


def test_layers_and_skip_restrict_the_search():
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.9), layers=["conv2", "fc1"])
    assert [la.name for la in df.factored_layers_of(compressed)] == ["conv2", "fc1"]
    assert df.gates_of(compressed).group_keys == [["conv2"], ["fc1"]]
    skipped = th.hybrid_compress(model, th.Budget(macs=0.9), skip=["fc1"])
    assert "fc1" not in [la.name for la in df.factored_layers_of(skipped)]
    assert ["fc1"] not in df.gates_of(skipped).group_keys and ["conv2"] not in df.gates_of(
        skipped
    ).group_keys


def test_names_that_are_not_layers_are_refused_with_the_closest_name():
    model = lenet5()
    with pytest.raises(ValueError, match=r"layers=.*'fc3' \(did you mean 'fc2'\?\).*'lenet5'"):
        th.hybrid_compress(model, th.Budget(macs=0.5), layers=["conv2", "fc3"])
    with pytest.raises(ValueError, match=r"skip=.*'Conv1' \(did you mean 'conv1'\?\)"):
        th.hybrid_compress(model, th.Budget(macs=0.5), skip=["Conv1"])


def test_a_nested_model_name_stands_for_all_its_layers():
    model = nested_model()  # block's 'conv' clashes with the outer one: 'block_conv'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bn and relu are not named one by one: no warning
        only = th.hybrid_compress(model, th.Budget(macs=0.9), layers=["block"])
    assert [la.name for la in df.factored_layers_of(only)] == ["block_conv"]
    assert df.gates_of(only).group_keys == [["block_conv", "conv", "shared"]]  # coupled by the Add
    skipped = th.hybrid_compress(model, th.Budget(macs=0.9), skip=["block"])
    assert [la.name for la in df.factored_layers_of(skipped)] == ["conv", "shared", "head"]
    assert df.gates_of(skipped) is None  # every channel group touches the block


def test_named_layers_that_cannot_be_compressed_are_warned_of_with_reasons():
    model = lenet5()
    with pytest.warns(UserWarning, match=r"uncompressed:\n  pool1: channels: .*MaxPooling2D"):
        compressed = th.hybrid_compress(model, th.Budget(macs=0.5), layers=["conv2", "pool1"])
    assert [la.name for la in df.factored_layers_of(compressed)] == ["conv2"]
    with pytest.warns(
        UserWarning, match=r"fc2: channels: it feeds the model output 'fc2'; rank: ranks"
    ):
        th.hybrid_compress(model, th.Budget(macs=0.5), layers=["conv2", "fc2"], ranks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.hybrid_compress(model, th.Budget(macs=0.5), layers=["conv2", "fc2"])
        th.hybrid_compress(model, th.Budget(macs=0.5), layers=["conv1", "pool1"])  # passes it
    with pytest.raises(ValueError, match=r"Per layer named in `layers`:\n  pool1: "):
        th.hybrid_compress(model, th.Budget(macs=0.5), layers=["pool1"])


@pytest.mark.parametrize(
    "budget,options,error,message",
    [
        (0.5, {}, TypeError, r"budget must be a tfhybrid.Budget, got float"),
        (th.Budget(macs=0.5), {"round_to": 0}, ValueError, r"DF\(round_to=0\)"),
        (th.Budget(macs=0.5), {"search_steps": 0}, ValueError, r"search_steps must be >= 1.* 0"),
    ],
)
def test_bad_options_are_refused(budget, options, error, message):
    with pytest.raises(error, match=message):
        th.hybrid_compress(lenet5(), budget, **options)


def test_dense_layers_on_sequences_are_searched_and_stripped_exactly():
    """A transformer's feed-forward block: Dense on (batch, tokens, features)."""
    inputs = keras.Input((12, 32))
    x = layers.Dense(64, activation="relu", name="ff1")(inputs)
    x = layers.Dense(32, name="ff2")(x)
    x = layers.LayerNormalization(name="norm")(layers.Add(name="residual")([inputs, x]))
    outputs = layers.Dense(5, name="head")(layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    x, y = _data(model, 32)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.3), search_steps=4)
    assert {"ff1", "ff2"} <= {la.name for la in df.factored_layers_of(compressed)}
    assert df.gates_of(compressed).group_keys == [["ff1"]]  # the residual stream touches the input
    _fit(compressed, x, y, epochs=2, batch_size=8)
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.3 * th.profile(model).macs
    _assert_strip_is_exact(compressed, small, x[:8])


def test_a_transformer_residual_stream_is_searched_through_layer_norm_and_attention(tmp_path):
    """LayerNormalization counts each channel by its gate and attention scales each head
    by its gate, so the hard-gated search model computes what the stripped one does."""
    model = randomize_batchnorm(small_vit(size=16, width=32, depth=1))
    x, y = _data(model, 32)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.4), search_steps=6)
    stream = ["block0_attention", "block0_mlp2", "patches"]  # the residual stream's producers
    assert stream in df.gates_of(compressed).group_keys
    assert ["block0_attention/heads"] in df.gates_of(compressed).group_keys
    norms = [la for la in compressed.layers if isinstance(la, surgery.MaskedLayerNormalization)]
    assert len(norms) == 3
    _fit(compressed, x, y, epochs=2, batch_size=8)
    path = str(tmp_path / "vit.keras")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x[:4]), compressed(x[:4]), rtol=1e-5, atol=1e-6)
    small = th.strip(loaded)
    assert th.profile(small).macs <= 0.4 * th.profile(model).macs
    stream = small.get_layer("patches").filters
    assert stream < 32 and small.get_layer("ln").gamma.shape == (stream,)
    assert small.get_layer("block0_attention").get_config()["output_shape"] == stream
    assert type(small.get_layer("ln")) is layers.LayerNormalization
    _assert_strip_is_exact(compressed, small, x[:8])


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_mid_search_load_and_resume(tmp_path, suffix):
    model = lenet5()
    x, y = _data(model, 64)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.2), search_steps=12)
    _fit(compressed, x, y, epochs=1)  # 4 of 12 search steps
    path = str(tmp_path / f"search{suffix}")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert isinstance(loaded, th.CompressionModel)
    assert int(loaded.compression_step.numpy()) == 4
    np.testing.assert_allclose(loaded(x[:4]), compressed(x[:4]), rtol=1e-5, atol=1e-6)
    for a, b in zip(df.gates_of(loaded).logits, df.gates_of(compressed).logits):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[th.CompressionScheduler()])
    assert int(loaded.compression_step.numpy()) == 16 and loaded.search_finished()
    small = th.strip(loaded)
    assert th.profile(small).macs <= 0.2 * th.profile(model).macs
    _assert_strip_is_exact(loaded, small, x[:8])


def test_fit_without_the_scheduler_is_refused():
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.5))
    compressed.compile("adam", "sparse_categorical_crossentropy")
    x, y = _data(lenet5(), 16)
    with pytest.raises(ValueError, match=r"add callbacks=\[tfhybrid.CompressionScheduler\(\)\]"):
        compressed.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"train_on_batch cannot take the search's decisions"):
        compressed.train_on_batch(x, y)
    plain = lenet5()
    plain.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="models made by tfhybrid.hybrid_compress"):
        plain.fit(x, y, verbose=0, callbacks=[th.CompressionScheduler()])


def test_the_step_advances_per_batch_and_several_steps_per_call_are_refused():
    x, y = _data(lenet5(), 48)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.5), search_steps=5)
    compressed.compile("adam", "sparse_categorical_crossentropy", steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=2.*steps_per_execution=1"):
        compressed.fit(x, y, batch_size=16, verbose=0, callbacks=[th.CompressionScheduler()])
    compressed.compile("adam", "sparse_categorical_crossentropy")
    compressed.fit(x, y, batch_size=16, verbose=0, callbacks=[th.CompressionScheduler()])
    assert int(compressed.compression_step.numpy()) == 3 and not compressed.search_finished()
    compressed.fit(x, y, batch_size=16, verbose=0, callbacks=[th.CompressionScheduler()])
    assert compressed.search_finished()  # the decisions were taken before batch 5 of 6
    assert float(compressed.ratios(hard=True)["macs"]) <= 0.5


def test_the_search_step_is_traced_once():
    """fit builds the optimizer's slots first: a step that creates them is traced twice."""
    x, y = _data(lenet5(), 32)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=2)
    _fit(compressed, x, y, epochs=2)
    assert compressed.train_function.experimental_get_tracing_count() == 1
    assert compressed.search_finished()


def test_nothing_compressible_lists_the_reason_per_group():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layers.Dense(4, activation="softmax", name="head")(inputs))
    with pytest.raises(ValueError, match=r"Nothing to compress(.|\n)*group 0 .*model input"):
        th.hybrid_compress(model, th.Budget(macs=0.5), ranks=False)


def test_budget_below_the_incompressible_part_gives_the_minimum():
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(64, 3, name="big")(inputs)  # consumes the model input: fixed cost
    x = layers.Conv2D(8, 1, name="small")(x)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ValueError, match=r"cannot be met.*macs=0\.\d{4}"):
        th.hybrid_compress(model, th.Budget(macs=0.001), ranks=False)


def test_strip_refuses_plain_models():
    with pytest.raises(TypeError, match="made by tfhybrid.hybrid_compress"):
        th.strip(lenet5())


def test_compression_variables_follow_their_own_optimizer_not_the_users():
    x, y = _data(lenet5(), 32)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.2), search_steps=50)
    own = compressed.compression_variables()
    assert len(own) == len(df.gates_of(compressed).logits) + len(df.factored_layers_of(compressed))
    weights = {v.ref(): v.numpy().copy() for v in compressed.trainable_variables}
    compressed.compile(
        keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    compressed.fit(x, y, batch_size=16, verbose=0, callbacks=[th.CompressionScheduler()])
    own_refs = {v.ref() for v in own}
    for variable in compressed.trainable_variables:
        changed = not np.array_equal(variable.numpy(), weights[variable.ref()])
        assert changed == (variable.ref() in own_refs), variable.name
    assert int(compressed.compression_optimizer.iterations.numpy()) == 2
    # The user's optimizer holds no slot of a compression variable (SGD with momentum).
    frozen = th.hybrid_compress(
        lenet5(),
        th.Budget(macs=0.2),
        search_steps=50,
        compression_optimizer=keras.optimizers.SGD(0.0),
    )
    frozen.compile(
        keras.optimizers.SGD(1e-3, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = [v.numpy().copy() for v in frozen.compression_variables()]
    frozen.fit(x, y, batch_size=16, verbose=0, callbacks=[th.CompressionScheduler()])
    for before, variable in zip(start, frozen.compression_variables()):
        np.testing.assert_array_equal(before, variable.numpy())
    slots = len(frozen.optimizer.variables()) - 1  # one momentum per weight, and iterations
    assert slots == len(frozen.trainable_variables) - len(start)


def test_a_bad_compression_optimizer_is_refused():
    with pytest.raises(ValueError, match="compression_optimizer='nope'.*Keras optimizer"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), compression_optimizer="nope")


def test_without_search_steps_the_search_lasts_half_of_the_first_fit(tmp_path):
    x, y = _data(lenet5(), 64)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3))
    assert compressed.search_steps is None
    compressed.predict(x[:4], verbose=0)  # traced before the length was known
    _fit(compressed, x, y, epochs=3)  # 3 epochs of 4 batches: the search takes 6
    assert compressed.search_steps == 6 and compressed.search_finished()
    assert df.gates_of(compressed).temperature.steps == 6
    assert all(la.temperature.steps == 6 for la in df.factored_layers_of(compressed))
    assert compressed.penalty_weight.steps == 1  # 6 // 4
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.3 * th.profile(lenet5()).macs
    _assert_strip_is_exact(compressed, small, x[:8])
    path = str(tmp_path / "decided.keras")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert loaded.search_steps == 6 and df.gates_of(loaded).temperature.steps == 6


def test_a_user_schedule_is_kept_when_the_fit_sets_the_length():
    x, y = _data(lenet5(), 32)
    mine = th.ExponentialDecay(1.0, 0.5, 100)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), temperature=mine)
    _fit(compressed, x, y, epochs=2)
    assert compressed.search_steps == 2 and df.gates_of(compressed).temperature.end == 0.5


def test_a_search_of_unknown_length_asks_for_search_steps():
    x, y = _data(lenet5(), 32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(8)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3))
    with pytest.raises(ValueError, match="length is unknown.*search_steps=N"):
        _fit_on(compressed, data)


def _fit_on(compressed, data):
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compressed.fit(data, verbose=0, callbacks=[th.CompressionScheduler()])


def test_a_fit_and_a_strip_before_the_search_ends_warn():
    x, y = _data(lenet5(), 32)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=10)
    with pytest.warns(UserWarning, match=r"ended at step 2 of .* search's 10.*still soft"):
        _fit(compressed, x, y, epochs=1)
    with pytest.warns(UserWarning, match=r"still searching \(step 2 of 10\).*projected"):
        small = th.strip(compressed)
    assert th.profile(small).macs <= 0.3 * th.profile(lenet5()).macs
    _fit(compressed, x, y, epochs=4)  # the search ends: neither warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.strip(compressed)


@pytest.mark.parametrize(
    "budget, technique, figure",
    [
        (th.Budget(bits=0.01), th.LC({("fc1", "fc2", "fc3"): th.Quantize(2)}), "bits 0.03"),
        (th.Budget(macs=0.5), th.Sparse(sparsity=0.5), "macs 1.0000 (budget 0.5)"),
    ],
    ids=["lc_bits", "sparse_macs"],
)
def test_a_search_that_ends_over_its_budget_says_where(budget, technique, figure):
    compressed = th.hybrid_compress(lenet_300_100(), budget, [technique], search_steps=1)
    with pytest.warns(UserWarning, match="ended over its budget") as caught:
        compressed.finish_search()
    assert figure in str(caught[0].message)
    met = th.hybrid_compress(lenet_300_100(), th.Budget(bits=0.9), [technique], search_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        met.finish_search()
