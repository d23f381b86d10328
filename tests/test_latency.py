"""The latency table (`tfhybrid.latency`), its measurement in LiteRT
(`export.latency_table`) and `Budget(latency=...)` through the shared cost model."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import channels, cost, graph
from tfhybrid.export import latency_table
from tfhybrid.latency import LatencyTable, LayerLatency

from models import assert_unchanged, lenet5, max_relative_diff, weights_snapshot

keras = th.keras
layers = keras.layers


def small_cnn() -> keras.Model:
    """Conv, depthwise conv, 1 x 1 conv, Dense: every kind the table times."""
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = layers.Conv2D(16, 1, activation="relu", name="pointwise")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(4, name="head")(x))


def synthetic_table(model, per_pixel: float = 0.0, rest_ms: float = 0.01) -> LatencyTable:
    """A table of `model` with a known law: per call 1e-6 ms per MAC, plus `per_pixel`
    ms per output position (the part of an int8 op that channels do not shrink)."""
    entries = {}
    for op in graph.ops(graph.flatten(model)):
        layer = op.layer
        if not latency_table.is_timed(layer):
            continue
        in_shape, out_shape = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
        pixels = math.prod(out_shape[1:-1])
        area = math.prod(getattr(layer, "kernel_size", (1,)))
        cin = latency_table.channel_grid(in_shape[-1], latency_table.FRACTIONS)
        if isinstance(layer, layers.DepthwiseConv2D):
            cout = (out_shape[-1],)
            ms = [[1e-6 * pixels * area * c + per_pixel * pixels] for c in cin]
        else:
            cout = latency_table.channel_grid(out_shape[-1], latency_table.FRACTIONS)
            ms = [[1e-6 * pixels * area * c * o + per_pixel * pixels for o in cout] for c in cin]
        split = None
        if layer.name != "depthwise":
            split = [[1e-6 * pixels * r * o + per_pixel * pixels for o in cout] for r in cout]
        entries[layer.name] = LayerLatency(cin, cout, ms, split)
    full = sum(lat.ms[-1][-1] for lat in entries.values())
    return LatencyTable(entries, full + rest_ms, rest_ms, "int8", 1)


def cost_model(model, table):
    return cost.CostModel.from_analysis(channels.analyze(model)).with_latency(table)


def test_layer_latency_is_exact_on_the_grid_and_bilinear_between():
    lat = LayerLatency((1, 4, 8), (2, 6), ((1.0, 2.0), (3.0, 5.0), (7.0, 11.0)))
    assert lat.at(4, 6) == 5.0 and lat.at(8, 2) == 7.0
    assert lat.at(6, 4) == pytest.approx((3 + 5 + 7 + 11) / 4)
    assert lat.at(2.5, 2) == pytest.approx(2.0)  # halfway from 1 to 4 inputs
    assert lat.at(0.2, 100) == 2.0 and lat.at(100, 100) == 11.0  # clamped to the grid


def test_the_grid_times_one_and_two_channels_each_fraction_and_all():
    assert latency_table.channel_grid(20, latency_table.FRACTIONS) == (1, 2, 5, 10, 15, 20)
    assert latency_table.channel_grid(1, latency_table.FRACTIONS) == (1,)
    assert latency_table.channel_grid(8, (0.5, 1.0)) == (4, 8)


@pytest.mark.parametrize(
    "bad",
    [
        {"cin": (4, 1)},
        {"cout": (0, 2)},
        {"ms": ((1.0,),)},
        {"split": ((1.0, 2.0),)},
    ],
)
def test_a_malformed_layer_latency_is_refused(bad):
    fields = {"cin": (1, 4), "cout": (1, 2), "ms": ((1.0, 2.0), (3.0, 4.0)), **bad}
    with pytest.raises(ValueError, match="LayerLatency"):
        LayerLatency(**fields)


def test_the_cost_model_interpolates_the_table_for_channels_and_ranks():
    model = small_cnn()
    table = synthetic_table(model, per_pixel=2e-5)
    costs = cost_model(model, table)
    assert costs.costs()["latency"] == pytest.approx(table.whole_ms)
    counts = {costs.sizes.index(8): 4, costs.sizes.index(16): 8}  # on the grid: half of each
    expected = (
        table.rest_ms
        + table.layers["conv"].at(3, 4)
        + table.layers["depthwise"].at(4, 4)
        + table.layers["pointwise"].at(4, 8)
        + table.layers["head"].at(8, 4)
    )
    assert costs.costs(counts)["latency"] == pytest.approx(expected)
    # pointwise split at rank 2: its first factor with 2 outputs, then 2 -> 16 at 1 x 1.
    split = costs.costs(ranks={"pointwise": 2})["latency"]
    pointwise = table.layers["pointwise"]
    second = LayerLatency(pointwise.cout, pointwise.cout, pointwise.split)
    first = pointwise.at(8, 2)
    second = second.at(2, 16)
    assert split == pytest.approx(table.whole_ms - pointwise.ms[-1][-1] + first + second)


def test_the_tensor_latency_equals_the_numbers_and_has_a_gradient():
    model = small_cnn()
    costs = cost_model(model, synthetic_table(model, per_pixel=2e-5))
    counts = {gid: 0.6 * size for gid, size in enumerate(costs.sizes)}
    variables = {gid: tf.Variable(float(n)) for gid, n in counts.items()}
    with tf.GradientTape() as tape:
        latency = costs.costs(variables)["latency"]
    assert float(latency) == pytest.approx(costs.costs(counts)["latency"], rel=1e-5)
    gradients = tape.gradient(latency, list(variables.values()))
    assert any(g is not None and float(g) > 0 for g in gradients)


def test_a_table_of_another_model_is_refused_naming_the_layer():
    model, other = small_cnn(), lenet5()
    base = cost.CostModel.from_analysis(channels.analyze(model))
    with pytest.raises(ValueError, match="'conv1'.*another model"):
        base.with_latency(synthetic_table(other))
    table = synthetic_table(model)
    wider = dict(table.layers)
    wider["pointwise"] = LayerLatency((1, 8), (1, 32), ((0.0, 0.0), (0.0, 0.0)))
    with pytest.raises(ValueError, match="'pointwise' has 8 input and 16 output"):
        base.with_latency(LatencyTable(wider, 1.0, 0.0, "int8", 1))
    without_head = {k: v for k, v in table.layers.items() if k != "head"}
    with pytest.raises(ValueError, match=r"no latency for \['head'\]"):
        base.with_latency(LatencyTable(without_head, 1.0, 0.0, "int8", 1))


def test_a_latency_budget_needs_a_table():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"latency=0.5\) needs .*latency-table"):
        th.hybrid_compress(model, th.Budget(latency=0.5))
    with pytest.raises(ValueError, match=r"latency=1.5\).*outside"):
        th.Budget(latency=1.5)


def test_a_latency_budget_search_meets_it_strips_exactly_and_saves(tmp_path):
    model = small_cnn()
    snapshot, config = weights_snapshot(model), model.get_config()
    table = synthetic_table(model, per_pixel=1e-5)
    path = tmp_path / "table.json"
    table.save(path)
    budget = th.Budget(latency=0.5, latency_table=str(path))
    compressed = th.hybrid_compress(model, budget, search_steps=8)
    x = np.random.default_rng(0).normal(size=(32, 12, 12, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, 32)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = compressed.fit(
        x, y, batch_size=8, epochs=3, verbose=0, callbacks=[th.CompressionScheduler()]
    )
    assert history.history["latency_ratio"][-1] <= 0.5
    assert compressed.ratios(hard=True)["latency"] <= 0.5
    small = th.strip(compressed)
    assert max_relative_diff(compressed, small, x[:4]) < 1e-4
    compressed.save(tmp_path / "search.keras")
    with th.custom_object_scope():
        loaded = keras.models.load_model(tmp_path / "search.keras")
    saved_ratio = float(loaded.ratios(hard=True)["latency"])
    assert saved_ratio == pytest.approx(float(compressed.ratios(hard=True)["latency"]))
    assert_unchanged(model, snapshot, config)


def test_a_latency_budget_the_constant_rest_cannot_meet_is_refused():
    model = small_cnn()
    table = synthetic_table(model, rest_ms=1.0)  # the rest alone is nearly all of it
    with pytest.raises(ValueError, match="cannot be met.*latency="):
        th.hybrid_compress(model, th.Budget(latency=0.5, latency_table=table))


def test_the_projection_cuts_through_a_flat_latency_to_the_step_that_saves():
    """int8 LeNet-5's first convolution: the same time from 2 filters to all, a third of
    it with one; only that cut meets the budget."""
    model = small_cnn()
    table = synthetic_table(model, rest_ms=0.0)
    layers = {  # every other layer as fast with any channel count: nothing else to cut
        name: LayerLatency(
            lat.cin, lat.cout, tuple((lat.ms[-1][-1],) * len(lat.cout) for _ in lat.cin)
        )
        for name, lat in table.layers.items()
    }
    conv = table.layers["conv"]
    flat = tuple(tuple(0.002 if o == 1 else 0.006 for o in conv.cout) for _ in conv.cin)
    layers["conv"] = LayerLatency(conv.cin, conv.cout, flat, None)
    rest = sum(lat.ms[-1][-1] for name, lat in layers.items() if name != "conv")
    table = LatencyTable(layers, 0.006 + rest, 0.0, "int8", 1)
    target = (0.002 + rest) / table.whole_ms + 1e-3
    compressed = th.hybrid_compress(model, th.Budget(latency=target, latency_table=table))
    compressed.finish_search()
    assert float(compressed.ratios(hard=True)["latency"]) <= target
    assert th.strip(compressed).get_layer("conv").filters == 1


@pytest.fixture(scope="module")
def measured():
    """small_cnn's int8 table, measured in LiteRT on a coarse grid."""
    model = small_cnn()
    return model, latency_table.measure_latency_table(
        model, "int8", fractions=(0.0, 1.0), runs=3, warmup=1
    )


def test_a_measured_table_times_every_layer_on_its_grid(measured, tmp_path):
    model, table = measured
    assert set(table.layers) == {"conv", "depthwise", "pointwise", "head"}
    assert table.layers["pointwise"].cin == (1, 2, 8)
    assert table.layers["pointwise"].cout == (1, 2, 16)
    assert table.layers["depthwise"].cout == (8,) and table.layers["depthwise"].split is None
    assert table.layers["head"].split is not None and table.quantize == "int8"
    assert table.whole_ms > 0 and table.full_ms() >= table.whole_ms - 1e-12
    assert table.full_ms() == pytest.approx(table.whole_ms)  # scaled to the whole model
    for lat in table.layers.values():
        for grid in (lat.ms, lat.split or lat.ms):
            values = np.asarray(grid)
            assert (values >= 0).all()
            assert (np.diff(values, axis=0) >= 0).all() and (np.diff(values, axis=1) >= 0).all()
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    assert cost_model(model, table).costs()["latency"] == pytest.approx(table.full_ms())


def test_measuring_refuses_a_search_model_and_unknown_modes():
    model = small_cnn()
    with pytest.raises(ValueError, match="quantize='float16'"):
        latency_table.measure_latency_table(model, "float16")
    with pytest.raises(ValueError, match="fractions"):
        latency_table.measure_latency_table(model, fractions=(0.5, 2.0))
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5))
    with pytest.raises(ValueError, match="strip"):
        latency_table.measure_latency_table(compressed)


def test_a_file_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "junk.json"
    path.write_text('{"layers": {}}')
    with pytest.raises(ValueError, match="latency table"):
        LatencyTable.load(path)
