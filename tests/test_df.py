"""techniques.df: factored layers, gates, soft budget, projection onto the budget."""

import threading

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import channels, cost
from tfhybrid.techniques import df, magnitude

from models import lenet5, lenet_300_100, randomize_batchnorm, resnet_style

keras = th.keras
layers = keras.layers


def _search_layers(model):
    return [la for la in model.layers if isinstance(la, (df.ChannelGates, df._Factored))]


def test_factored_layers_start_at_the_truncated_svd_of_the_kernel_gated_near_one():
    inputs = keras.Input((9, 9, 4))
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="conv")(inputs)
    x = layers.Flatten()(x)
    outputs = layers.Dense(7, name="fc")(x)
    model = keras.Model(inputs, outputs)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.9), filters=False, search_steps=5)
    ranks = {la.name: la.rank for la in df.factored_layers_of(compressed)}
    # break-even ranks: ceil(36 * 12 / 48) = 9 < 12; ceil(300 * 7 / 307) = 7, full rank
    assert ranks == {"conv": 9, "fc": 7}
    conv = compressed.get_layer("conv")
    svd = np.linalg.svd(model.get_layer("conv").get_weights()[0].reshape(36, 12))
    np.testing.assert_allclose(conv.s.numpy(), svd[1][:9], rtol=1e-5)
    gates = conv.component_gates().numpy()
    assert np.all(gates > 0.85) and np.all(np.diff(gates) <= 0)  # the weakest are gated most
    # With every component kept (the search over), the layer is the truncated SVD.
    reference = th.factorize(model, {"conv": 9}, force=True)
    x = np.random.default_rng(0).normal(size=(3, 9, 9, 4)).astype(np.float32)
    assert not np.allclose(compressed(x), reference(x), rtol=1e-4, atol=1e-5)
    for layer in df.factored_layers_of(compressed):
        layer.decided.assign(1)
    np.testing.assert_allclose(compressed(x), reference(x), rtol=1e-4, atol=1e-5)


def test_masks_start_near_one_staggered_by_l1_norm_and_freeze_to_the_kept_channels():
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), ranks=False, search_steps=5)
    gates = df.gates_of(compressed)
    norms = magnitude.channel_l1_norms(model)
    assert gates.pace == df.PACED_STEPS / 5  # a short search: its logits move faster
    for index, gid in enumerate(gates.group_ids):
        start = gates.scores(index)
        # Equal norms (they happen in float32) keep their index order, as in staggered_logits.
        np.testing.assert_array_equal(np.argsort(start), np.argsort(norms[gid], kind="stable"))
        np.testing.assert_allclose(start.min(), df.INITIAL_LOGIT - df.INITIAL_SPREAD, rtol=1e-5)
        np.testing.assert_allclose(start.max(), df.INITIAL_LOGIT + df.INITIAL_SPREAD, rtol=1e-5)
        np.testing.assert_allclose(start.mean(), df.INITIAL_LOGIT, rtol=1e-5)
    assert float(tf.reduce_min(gates.masks()[0])) > 0.85
    gates.logits[0].assign(np.linspace(-1, 1, 20).astype(np.float32))
    compressed.finish_search()
    kept = gates.masks()[0].numpy()
    assert set(np.unique(kept)) <= {0.0, 1.0} and 0 < kept.sum() < 20
    np.testing.assert_array_equal(kept, gates.keep[0].numpy())


def test_staggered_logits_rank_equal_norms_by_channel_index():
    start = df.staggered_logits(np.array([2.0, 1.0, 1.0, 3.0], np.float32))
    np.testing.assert_array_equal(np.argsort(start), [1, 2, 0, 3])
    np.testing.assert_allclose(np.diff(np.sort(start)), 2 * df.INITIAL_SPREAD / 3, rtol=1e-6)


def test_soft_budget_is_differentiable_in_masks_and_thresholds():
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.2))
    with tf.GradientTape() as tape:
        ratio = compressed.ratios()["macs"]
    watched = df.gates_of(compressed).logits + [la.tau for la in df.factored_layers_of(compressed)]
    grads = tape.gradient(ratio, watched)
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    assert 0.5 < float(ratio) <= 1.0


@pytest.mark.parametrize("round_to,macs", [(1, 0.3), (4, 0.45)])
def test_projection_meets_the_budget_with_rounded_counts(round_to, macs):
    model = resnet_style()
    compressed = th.hybrid_compress(model, th.Budget(macs=macs, params=0.5), round_to=round_to)
    rng = np.random.default_rng(0)
    for logits in df.gates_of(compressed).logits:
        logits.assign(rng.normal(0.3, 0.2, logits.shape).astype(np.float32))
    keep, active = compressed.technique("df").hard_decisions(compressed)
    for kept in [*keep.values(), *active.values()]:
        assert kept.sum() % round_to == 0 or kept.sum() == kept.size
    small = th.strip(compressed)
    assert th.profile(small).macs <= macs * th.profile(model).macs
    assert th.profile(small).params <= 0.5 * th.profile(model).params
    assert all(float(la.step.numpy()) == 0 for la in _search_layers(compressed))


def test_hard_masked_model_and_stripped_model_agree():
    model = randomize_batchnorm(resnet_style())
    compressed = th.hybrid_compress(model, th.Budget(macs=0.4), search_steps=1)
    rng = np.random.default_rng(1)
    for logits in df.gates_of(compressed).logits:
        logits.assign(rng.normal(0.2, 0.3, logits.shape).astype(np.float32))
    for layer in df.factored_layers_of(compressed):
        layer.tau.assign(0.05)
    compressed.finish_search()
    assert compressed.search_finished()
    small = th.strip(compressed)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    expected = compressed(x, training=False).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(small(x, training=False), expected, atol=1e-4 * scale)
    assert not any(isinstance(la, (df.ChannelGates, df._Factored)) for la in small.layers)


def test_straight_through_budget_has_the_hard_value_and_the_soft_gradient():
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.2))
    df.gates_of(compressed).logits[1].assign(np.linspace(-1, 1, 50).astype(np.float32))
    with tf.GradientTape() as tape:
        ratio = compressed.ratios(straight_through=True)["macs"]
    assert float(ratio) == pytest.approx(float(compressed.ratios(hard=True)["macs"]))
    assert float(ratio) != pytest.approx(float(compressed.ratios()["macs"]))
    grad = tape.gradient(ratio, df.gates_of(compressed).logits[1])
    assert float(tf.reduce_sum(tf.abs(grad))) > 0


def test_factored_layers_use_unit_norm_factors_whatever_their_scale():
    """U's columns and V's rows are normalised in the call (s alone carries sizes)."""
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    outputs = layers.Dense(5, name="fc")(layers.Flatten()(x))
    compressed = th.hybrid_compress(
        keras.Model(inputs, outputs), th.Budget(macs=0.9), filters=False
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    before = compressed(x).numpy()
    for layer in df.factored_layers_of(compressed):  # rescale every component of U and V
        layer.u.assign(layer.u * rng.uniform(0.2, 5.0, layer.u.shape[1]))
        layer.v.assign(layer.v * rng.uniform(0.2, 5.0, (layer.v.shape[0], 1)))
    np.testing.assert_allclose(compressed(x), before, rtol=1e-4, atol=1e-5)
    conv = compressed.get_layer("conv")  # after the search, with every other component kept
    active = (np.arange(conv.rank) % 2 == 0).astype(np.float32)
    conv.active.assign(active)
    conv.decided.assign(1)
    kernel = conv.dense_kernel(active)
    expected = tf.nn.conv2d(x, kernel, 1, "VALID") + conv.bias
    np.testing.assert_allclose(conv(x), expected, rtol=1e-4, atol=1e-5)


def test_a_mask_multiplies_each_channel_once_after_the_layers_it_commutes_with():
    """LeNet-5's conv masks go on the pooled / flattened tensors (smaller, same function),
    and a soft mask m scales a channel by m, not m**2."""
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), ranks=False)
    gated = {node.inbound_layers.name for node in df.gates_of(compressed).inbound_nodes}
    assert gated == {"pool1", "flatten", "fc1"}
    rng = np.random.default_rng(0)
    for logits in df.gates_of(compressed).logits:
        logits.assign(rng.normal(0.0, 0.1, logits.shape).astype(np.float32))
    m1, m2, m3 = (m.numpy() for m in df.gates_of(compressed).masks())
    x = rng.normal(size=(2, 28, 28, 1)).astype(np.float32)
    h = model.get_layer("pool1")(model.get_layer("conv1")(x) * m1)
    h = model.get_layer("flatten")(model.get_layer("pool2")(model.get_layer("conv2")(h) * m2))
    expected = model.get_layer("fc2")(model.get_layer("fc1")(h) * m3)
    np.testing.assert_allclose(compressed(x), expected, rtol=1e-4, atol=1e-5)


def _dense_block() -> th.keras.Model:
    """Two DenseNet-style concatenations: every later tensor carries the earlier groups."""
    layers = th.keras.layers
    inputs = th.keras.Input((8, 8, 3))
    features = [layers.Conv2D(4, 3, padding="same", name="stem")(inputs)]
    for i in range(3):
        x = features[0] if i == 0 else layers.Concatenate(name=f"cat{i}")(features)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        features.append(layers.Conv2D(4, 3, padding="same", name=f"conv{i}")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(layers.Concatenate(name="cat")(features))
    return th.keras.Model(inputs, layers.Dense(5, name="logits")(x))


def test_a_training_step_builds_each_mask_and_gate_once_and_trains_them():
    """One sigmoid per channel group and per factored layer in a training step, however
    many tensors carry a group and however often the budget counts it (DenseNet121's
    search took minutes to trace when each tensor and count built its own)."""
    compressed = th.hybrid_compress(_dense_block(), th.Budget(macs=0.5))
    gates, factored = df.gates_of(compressed), df.factored_layers_of(compressed)
    assert len(gates.inbound_nodes) > len(gates.sizes) == 4 and factored  # masked repeatedly
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2)
    compressed.compile("adam", th.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    traced = tf.function(compressed.train_step).get_concrete_function((x, y))
    sigmoids = [op for op in traced.graph.get_operations() if op.type == "Sigmoid"]
    assert len(sigmoids) == len(gates.sizes) + len(factored)
    with tf.GradientTape() as tape:
        outputs = compressed(x, training=True)
    grads = tape.gradient(outputs, gates.logits + [la.s for la in factored])
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    for logits in gates.logits:
        logits.assign(rng.normal(0.0, 0.1, logits.shape).astype(np.float32))
    unshared = super(th.CompressionModel, compressed).call(tf.constant(x))  # built per tensor
    np.testing.assert_allclose(compressed(x), unshared, rtol=1e-5, atol=1e-6)


def test_a_layout_extending_one_masked_in_the_step_appends_to_its_mask():
    from tfhybrid import schedules

    temperature = schedules.serialize(schedules.ExponentialDecay(1.0, 0.05, 10))
    gates = df.ChannelGates([0, 1, 2], [["a"], ["b"], ["c"]], [2, 3, 4], temperature)
    gates.build(None)
    for i, logits in enumerate(gates.logits):
        logits.assign(np.linspace(-0.3, 0.3, logits.shape[0]) + 0.1 * i)
    block, grown = [[0, 2, 1], [-1, 5, 1]], [[0, 2, 1], [-1, 5, 1], [2, 4, 2]]
    whole = gates(tf.ones(15), layout=grown, mask_only=True)  # outside a step: built whole

    @tf.function
    def step():
        with gates.shared_decisions():
            gates(tf.ones(7), layout=block, mask_only=True)
            return gates(tf.ones(15), layout=grown, mask_only=True)

    np.testing.assert_allclose(step(), whole, rtol=1e-6)
    graph = step.get_concrete_function().graph
    joined = [
        len(op.inputs) - 1
        for op in graph.get_operations()
        if op.type == "ConcatV2" and op.outputs[0].dtype == tf.float32  # not shapes
    ]
    assert sorted(joined) == [2, 2]  # the block's mask, then it and the new group's


def test_shared_decisions_are_per_thread_and_end_with_their_context():
    """MirroredStrategy traces its replicas in threads of one graph: a replica must
    never get another's tensors."""
    gates = df.gates_of(th.hybrid_compress(lenet5(), th.Budget(macs=0.5)))
    with gates.shared_decisions():
        mask = gates.mask(0)
        assert gates.mask(0) is mask
        other = []
        thread = threading.Thread(target=lambda: other.append(gates.mask(0)))
        thread.start()
        thread.join()
        assert other[0] is not mask
    assert gates.mask(0) is not mask


def test_projection_gives_unused_budget_back_to_the_best_units():
    """A search that ends far under budget keeps the best units that still fit."""
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(macs=0.3))
    for logits in df.gates_of(compressed).logits:  # every channel off, the last ones least so
        logits.assign(np.linspace(-0.5, -0.1, logits.shape[0]).astype(np.float32))
    for layer in df.factored_layers_of(compressed):  # every component under the threshold
        layer.tau.assign(2.0)
    keep, _ = compressed.technique("df").hard_decisions(compressed)
    ratio = th.profile(th.strip(compressed)).macs / th.profile(model).macs
    assert 0.29 < ratio <= 0.3
    for kept in keep.values():
        assert kept.sum() >= 1 and np.all(np.flatnonzero(kept) >= kept.size - kept.sum())


def _usable_components_by_brute_force(model, name, budget):
    """The most components of `name` any model within the budget uses: its rank if split,
    min(rows, cols) if whole (more components add nothing to a whole kernel)."""
    analysis = channels.analyze(model)
    cost_model = cost.CostModel.from_analysis(analysis)
    original = cost_model.evaluate()
    ranked = [la.name for la in model.layers if isinstance(la, layers.Dense)]
    prunable = [g for g in analysis.groups if g.prunable]
    best = 0
    for counts in np.ndindex(*[g.size for g in prunable]):
        counts = {g.id: c + 1 for g, c in zip(prunable, counts)}
        rows, cols, _ = cost_model.kernel_matrix(name, counts)
        whole = cost_model.evaluate(counts, {n: 1 for n in ranked if n != name})
        for rank in range(1, int(min(rows, cols)) + 1):
            macs, params = cost_model.evaluate(counts, {**{n: 1 for n in ranked}, name: rank})
            ratios = {"macs": macs / original[0], "params": params / original[1]}
            usable = rank if macs < whole[0] else min(rows, cols)
            if budget.met_by(ratios):
                best = max(best, usable)
    return best


@pytest.mark.parametrize(
    "budget",
    [
        th.Budget(macs=0.6),
        th.Budget(macs=0.3),
        th.Budget(macs=0.15),
        th.Budget(params=0.25),
        th.Budget(macs=0.4, params=0.2),
    ],
)
def test_searched_ranks_keep_every_component_a_model_within_the_budget_can_use(budget):
    inputs = keras.Input((12,))
    x = layers.Dense(10, activation="relu", name="a")(inputs)
    x = layers.Dense(8, activation="relu", name="b")(x)
    model = keras.Model(inputs, layers.Dense(3, name="c")(x))
    searched = {la.name: la.rank for la in df.factored_layers_of(th.hybrid_compress(model, budget))}
    usable = {name: _usable_components_by_brute_force(model, name, budget) for name in searched}
    break_even = {n: df.searched_rank(model.get_layer(n).get_weights()[0]) for n in searched}
    for name, rank in searched.items():
        assert min(break_even[name], usable[name]) <= rank <= break_even[name], name
    # The input layer's rows cannot shrink, so its bound is nearly exact (6 at 0.6 and
    # 5, 2, 4, 3 at the others, against 6, 4, 2, 3, 3 components usable).
    assert searched["a"] <= min(break_even["a"], usable["a"] + 1)


def test_lenet_300_100_at_a_tenth_searches_what_its_first_layer_can_keep():
    hybrid = th.hybrid_compress(lenet_300_100(), th.Budget(macs=0.1))
    ranks_only = th.hybrid_compress(lenet_300_100(), th.Budget(macs=0.1), filters=False)
    # 10% of 266,200 MACs, less fc2 and fc3 at their smallest, over 784 + 1 (one unit
    # left) or 784 + 300 (filters=False) MACs per component; break-even ranks 217 and 75.
    assert {la.name: la.rank for la in df.factored_layers_of(hybrid)} == {
        "fc1": 33,
        "fc2": 75,
        "fc3": 10,
    }
    assert {la.name: la.rank for la in df.factored_layers_of(ranks_only)}["fc1"] == 24


@pytest.mark.parametrize(("budget", "two_convs"), [(0.9, False), (0.2, True)])
def test_a_factored_conv_equals_its_truncated_svd_as_one_conv_or_two(budget, two_convs):
    inputs = keras.Input((9, 9, 4))
    x = layers.Conv2D(12, 3, padding="same", dilation_rate=2, name="conv")(inputs)
    model = keras.Model(inputs, layers.Conv2D(5, 3, strides=2, name="head")(x))
    compressed = th.hybrid_compress(model, th.Budget(macs=budget), filters=False, search_steps=5)
    conv = compressed.get_layer("conv")
    # At 0.2 the budget leaves conv 1 of its 9 break-even components: two convs need
    # 32 * 81 * 48 MACs, forming the kernel and one conv 36 * 12 + 32 * 81 * 432.
    assert conv.runs_as_two_convs((None, 9, 9, 4)) is two_convs
    for layer in df.factored_layers_of(compressed):
        layer.decided.assign(1)
    full = {"conv": 12, "head": 5}  # a layer keeping all its components is the plain one
    ranks = {
        la.name: la.rank for la in df.factored_layers_of(compressed) if la.rank < full[la.name]
    }
    reference = th.factorize(model, ranks, force=True)
    x = np.random.default_rng(0).normal(size=(3, 9, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(compressed(x), reference(x), rtol=1e-4, atol=1e-5)


def _reference_factored(layer, x):
    """A factored layer's output by its definition, op by op: unit-norm U and V,
    the kernel formed, the plain layer's op."""
    u = layer.u / tf.norm(layer.u, axis=0)
    v = layer.v / tf.norm(layer.v, axis=1, keepdims=True)
    kernel = tf.reshape((u * layer.s * layer.component_gates()) @ v, layer._kernel_shape())
    config = layer.plain["config"]
    if isinstance(layer, df.FactoredDense):
        outputs = x @ kernel
    else:
        outputs = tf.nn.conv2d(
            x,
            kernel,
            config["strides"],
            config["padding"].upper(),
            dilations=config["dilation_rate"],
        )
    return layer.activation(outputs + layer.bias)


@pytest.mark.parametrize("two_convs", [False, True])
def test_factored_layers_compute_their_definition_and_its_gradients(two_convs, monkeypatch):
    """Whatever the route (1 x 1 convs as matrix products, the scale on the smaller
    factor, two convs or one, the norms' own gradient), the function and gradients are
    those of W = U diag(s g) V with unit-norm U columns and V rows."""
    routed = {}  # layer -> the input shape its route was chosen for

    def route(self, shape):
        routed[self.name] = tuple(shape)
        return two_convs

    monkeypatch.setattr(df.FactoredConv2D, "runs_as_two_convs", route)
    inputs = keras.Input((7, 7, 6))
    x = layers.Conv2D(10, 1, activation="relu", name="pointwise")(inputs)
    x = layers.Conv2D(9, 3, strides=2, padding="same", name="wide_rows")(x)
    x = layers.Conv2D(16, 1, strides=2, name="strided_pointwise")(x)
    x = layers.Conv2D(40, 2, name="wide_cols")(x)
    outputs = layers.Dense(7, name="fc")(layers.Flatten()(x))
    compressed = th.hybrid_compress(keras.Model(inputs, outputs), th.Budget(macs=0.6))
    rng = np.random.default_rng(0)
    checked = 0
    for layer in df.factored_layers_of(compressed):
        layer.u.assign(layer.u * rng.uniform(0.5, 2.0, layer.u.shape[1]))  # not unit norm
        layer.tau.assign(0.02)  # gates well inside (0, 1)
        shape = (3, *layer.input.shape[1:])
        x = tf.constant(rng.normal(size=shape).astype(np.float32))
        weights = rng.normal(size=layer.compute_output_shape(shape)).astype(np.float32)
        variables = [layer.u, layer.s, layer.v, layer.tau, layer.bias]
        results = []
        for function in (layer, lambda x, la=layer: _reference_factored(la, x)):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(function(x) * weights)
            results.append([loss, *tape.gradient(loss, [x, *variables])])
        for got, expected in zip(*results):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5, err_msg=layer.name)
        if isinstance(layer, df.FactoredConv2D):  # chosen for the layer's own input
            assert routed.pop(layer.name) == shape, layer.name
        checked += 1
    assert checked == 5


def test_pacing_keeps_every_mask_and_gate():
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=100)
    layers = th.DF().decision_layers(compressed)
    assert [layer.pace for layer in layers] == [df.PACED_STEPS / 100] * len(layers)
    masks = [m.numpy() for m in df.gates_of(compressed).masks()]
    gates = [la.component_gates().numpy() for la in df.factored_layers_of(compressed)]
    for layer in layers:
        layer.set_pace(1.0)
    for before, after in zip(masks, df.gates_of(compressed).masks()):
        np.testing.assert_allclose(after, before, rtol=1e-6)
    for before, layer in zip(gates, df.factored_layers_of(compressed)):
        np.testing.assert_allclose(layer.component_gates(), before, rtol=1e-6)


@pytest.mark.parametrize("pace", ["paced", "usual"])
def test_a_short_search_meets_the_budget_by_its_own_decisions(pace):
    """200 steps are too few for logits moving at the usual rate: the search's own hard
    decisions stay far above the budget and the projection does all the cutting."""
    x = np.random.default_rng(0).normal(size=(64, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 64)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), ranks=False, search_steps=200)
    if pace == "usual":
        for layer in th.DF().decision_layers(compressed):
            layer.set_pace(1.0)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit = {"batch_size": 8, "epochs": 24, "verbose": 0}  # 192 steps: still searching
    compressed.fit(x, y, callbacks=[th.CompressionScheduler()], **fit)
    searched = float(compressed.ratios(hard=True)["macs"])
    assert searched < 0.4 if pace == "paced" else searched > 0.6
