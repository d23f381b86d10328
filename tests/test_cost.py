"""profile: MACs against hand counts and TensorFlow's own graph profiler; params."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

import tfhybrid as th

from models import lenet5, resnet_style

keras = th.keras
layers = keras.layers

#: Graph ops whose float operations are multiply-accumulates (2 FLOPs each).
_MAC_OPS = ("Conv2D", "MatMul", "BatchMatMulV2", "DepthwiseConv2dNative", "Conv2DBackpropInput")


def tensorflow_profiler_macs(model) -> int:
    """MACs by TensorFlow's graph profiler: float ops of the MAC ops / 2, batch 1."""
    spec = tf.TensorSpec((1,) + tuple(model.input_shape[1:]), tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph = convert_variables_to_constants_v2(function).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    root = tf.compat.v1.profiler.profile(graph=graph, cmd="scope", options=options)
    op_types = {op.name: op.type for op in graph.get_operations()}
    flops, stack = 0, [root]
    while stack:
        node = stack.pop()
        if op_types.get(node.name) in _MAC_OPS:
            flops += node.float_ops
        stack.extend(node.children)
    return flops // 2


def _mixed_model():
    inputs = keras.Input((12, 12, 4))
    x = layers.SeparableConv2D(8, 3, depth_multiplier=2, padding="same")(inputs)
    x = layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2)(x)
    x = layers.Conv2D(6, 3, padding="same")(x)
    x = layers.Reshape((-1, 6))(x)
    x = layers.Dense(5)(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize(
    "build",
    [
        lenet5,
        resnet_style,
        _mixed_model,
        lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10),
        lambda: keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10),
    ],
)
def test_macs_agree_with_tensorflow_profiler(build):
    model = build()
    assert th.profile(model).macs == tensorflow_profiler_macs(model)


def test_lenet_hand_count():
    prof = th.profile(lenet5())
    assert prof.layer("conv1").macs == 24 * 24 * 5 * 5 * 1 * 20
    assert prof.layer("conv2").macs == 8 * 8 * 5 * 5 * 20 * 50
    assert prof.layer("fc1").macs == 800 * 500
    assert prof.layer("pool1").macs == 0
    assert prof.macs == 2_293_000
    assert prof.params == 431_080


def test_hand_counts_for_transposed_grouped_and_sequence_layers():
    inputs = keras.Input((5, 5, 8))
    t = layers.Conv2DTranspose(3, 3, strides=2, name="deconv")(inputs)
    g = layers.Conv2D(6, 3, groups=2, name="grouped")(inputs)
    s = layers.Dense(4, name="seq")(layers.Reshape((25, 8))(inputs))
    # TF runs dilated convs on a padded space-to-batch layout, so its profiler counts more.
    d = layers.Conv2D(2, 3, dilation_rate=2, padding="same", name="dilated")(inputs)
    prof = th.profile(keras.Model(inputs, [t, g, s, d]))
    assert prof.layer("deconv").macs == 5 * 5 * 3 * 3 * 8 * 3
    assert prof.layer("grouped").macs == 3 * 3 * 3 * 3 * (8 // 2) * 6
    assert prof.layer("seq").macs == 25 * 8 * 4
    assert prof.layer("dilated").macs == 5 * 5 * 3 * 3 * 8 * 2


def test_params_match_keras_and_shared_layers_count_once():
    inputs = keras.Input((10,))
    shared = layers.Dense(10, name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    prof = th.profile(model)
    assert prof.params == model.count_params() == 110
    assert [c.params for c in prof.layers] == [110, 0]
    assert prof.macs == 200


def test_sequential_and_nested_models_count_like_their_flat_version():
    inner = lenet5()
    inputs = keras.Input((28, 28, 1))
    outer = keras.Model(inputs, layers.Softmax()(inner(inputs)))
    assert th.profile(outer).macs == th.profile(inner).macs
    assert th.profile(outer).params == inner.count_params()


def test_cost_model_matches_profile_before_and_after_pruning():
    from tfhybrid import channels, cost

    from models import APPLICATIONS, MODERN, random_removal

    zoo = [APPLICATIONS[name] for name in ("MobileNetV2", "DenseNet121")]
    # grouped convs, LayerScale, LayerNormalization, self-attention
    zoo += [MODERN[name] for name in ("RegNetY004", "ConvNeXtTiny", "SmallViT")]
    for build in (lenet5, resnet_style, *zoo):
        model = build()
        analysis = channels.analyze(model)
        model_cost = cost.CostModel.from_analysis(analysis)
        full = th.profile(model)
        assert model_cost.evaluate() == (full.macs, full.params)
        remove = random_removal(model, 0.3)
        pruned = th.profile(th.prune_channels(model, remove))
        counts = {gid: analysis.groups[gid].size - len(r) for gid, r in remove.items()}
        assert model_cost.evaluate(counts) == (pruned.macs, pruned.params)
        again = cost.CostModel.from_config(model_cost.get_config())
        assert again.evaluate(counts) == (pruned.macs, pruned.params)


def test_a_cost_model_saved_with_two_mac_terms_still_loads():
    from tfhybrid import channels, cost

    model_cost = cost.CostModel.from_analysis(channels.analyze(lenet5()))
    config = model_cost.get_config()
    for term in config["terms"]:
        assert term["macs"][0] == term["macs"][3] == 0.0  # no constant, no cout-only term
        term["macs"] = term["macs"][1:3]  # the (a, b) form saved before
    counts = {1: 7, 2: 30}  # conv1 and conv2 keep 7 and 30 filters
    assert cost.CostModel.from_config(config).evaluate(counts) == model_cost.evaluate(counts)


def test_self_attention_costs_match_hand_count():
    tokens, width, heads, key_dim, value_dim, out = 10, 12, 3, 4, 5, 7
    inputs = keras.Input((tokens, width))
    attention = layers.MultiHeadAttention(heads, key_dim, value_dim, output_shape=out)
    model = keras.Model(inputs, attention(inputs, inputs))
    projections = tokens * width * heads * (2 * key_dim + value_dim)
    scores_and_sum = tokens * tokens * heads * (key_dim + value_dim)
    output = tokens * heads * value_dim * out
    assert th.profile(model).macs == projections + scores_and_sum + output
    biases = heads * (2 * key_dim + value_dim) + out
    kernels = width * heads * (2 * key_dim + value_dim) + heads * value_dim * out
    assert th.profile(model).params == kernels + biases


def test_a_count_given_as_a_tensor_costs_what_the_number_costs_with_its_gradient():
    from tfhybrid import channels, cost

    from models import random_removal

    model = resnet_style()
    analysis = channels.analyze(model)
    model_cost = cost.CostModel.from_analysis(analysis)
    remove = random_removal(model, 0.3)
    counts = {gid: analysis.groups[gid].size - len(r) for gid, r in remove.items()}
    group = max(counts, key=lambda gid: analysis.groups[gid].size)
    numbers = model_cost.costs(counts)
    count = tf.Variable(float(counts[group]))
    with tf.GradientTape() as tape:
        tensors = model_cost.costs({**counts, group: count})
    for kind, value in numbers.items():
        np.testing.assert_allclose(tensors[kind], value, rtol=1e-6, err_msg=kind)
    # MACs are at most quadratic in one group's count: the central difference is exact.
    above, below = ({**counts, group: counts[group] + d} for d in (1, -1))
    slope = (model_cost.costs(above)["macs"] - model_cost.costs(below)["macs"]) / 2
    np.testing.assert_allclose(tape.gradient(tensors["macs"], count), slope, rtol=1e-5)


def test_cost_model_counts_a_split_only_where_it_is_cheaper():
    from tfhybrid import channels, cost

    model = lenet5()
    model_cost = cost.CostModel.from_analysis(channels.analyze(model))
    for rank in (10, 300, 400):
        split = th.profile(th.factorize(model, {"fc1": rank}, force=True))
        expected = min(split.macs, th.profile(model).macs)
        assert model_cost.evaluate(ranks={"fc1": rank})[0] == expected


def test_kernel_matrix_is_the_layer_as_profile_counts_it_and_follows_its_input_group():
    from tfhybrid import channels, cost

    model = lenet5()
    analysis = channels.analyze(model)
    model_cost = cost.CostModel.from_analysis(analysis)
    rows, cols, positions = model_cost.kernel_matrix("conv2")
    conv2 = next(c for c in th.profile(model).layers if c.name == "conv2")
    assert (rows, cols) == (5 * 5 * 20, 50) and positions * rows * cols == conv2.macs
    conv1_group = next(g.id for g in analysis.groups if g.layers("produces") == ["conv1"])
    assert model_cost.kernel_matrix("conv2", {conv1_group: 8})[:2] == (5 * 5 * 8, 50)
    with pytest.raises(ValueError, match="'pool1' is not a Dense/Conv2D"):
        model_cost.kernel_matrix("pool1")


def test_layers_it_cannot_count_are_named_in_a_warning():
    search = th.hybrid_compress(lenet5(), th.Budget(macs=0.5), filters=False)
    with pytest.warns(UserWarning, match=r"0 MACs .*'fc1' \(FactoredDense\).*strip"):
        th.profile(search)
    efficientnet = keras.applications.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    with pytest.warns(UserWarning, match="still searching"):
        small = th.strip(search)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalization and batch norm weights are not kernels
        th.profile(efficientnet)
        th.profile(small)


def test_costs_count_non_zeros_bitmaps_and_shared_values_as_the_docs_say():
    """Hand counts on a two-layer model (the rules of docs/cost.md)."""
    from tfhybrid import channels, cost

    inputs = keras.Input((6,))
    hidden = layers.Dense(4, name="a")(inputs)  # kernel 6 x 4 = 24, bias 4
    model = keras.Model(inputs, layers.Dense(3, name="b")(hidden))  # kernel 12, bias 3
    model_cost = cost.CostModel.from_analysis(channels.analyze(model))
    assert model_cost.costs() == {"macs": 36, "params": 43, "bits": 32 * 43}
    # a at density 0.25: 6 of its 24 weights are stored, with a 24-bit bitmap.
    sparse = model_cost.costs(densities={"a": 0.25})
    assert sparse["params"] == 43 - 18 and sparse["bits"] == 32 * 25 + 24
    assert sparse["macs"] == 36  # dense kernels multiply the zeros too
    # b with 4 shared values: 12 entries of 2 bits and a table of 4 float32 values.
    shared = model_cost.costs(bits={"b": (2, 4)})
    assert shared["params"] == 43 and shared["bits"] == 32 * (43 - 12) + 12 * 2 + 4 * 32
    # Both, with a's output thinned to 2 channels: a keeps 12 entries (3 non-zero),
    # b keeps 6 entries.
    group = next(g.id for g in channels.analyze(model).groups if g.layers("produces") == ["a"])
    both = model_cost.costs({group: 2}, densities={"a": 0.25}, bits={"b": (2, 4)})
    assert both["params"] == 3 + 2 + 6 + 3
    assert both["bits"] == 32 * (3 + 2 + 3) + 12 + 6 * 2 + 4 * 32


def test_profile_measures_non_zeros_and_the_cheapest_storage_of_each_tensor():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, layers.Dense(40, name="a")(inputs))  # kernel 240, bias 40
    kernel = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32)
    kernel[:, :30] = 0.0  # 60 non-zeros of 240
    model.get_layer("a").set_weights([kernel, np.arange(40, dtype=np.float32)])
    prof = th.profile(model)
    assert prof.params == 280 and prof.nonzero_params == 60 + 39
    # kernel: 32 * 60 + 240 (bitmap) < 32 * 240; bias: 40 distinct values, 6-bit
    # indices and a table (6 * 40 + 32 * 40) beat 32 * 39 + 40 and 32 * 40.
    assert prof.bits == (32 * 60 + 240) + min(32 * 40, 32 * 39 + 40, 6 * 40 + 32 * 40)
    shared = np.where(kernel > 0, 0.5, -0.5).astype(np.float32)  # 2 values: 1 bit each
    model.get_layer("a").set_weights([shared, np.zeros(40, np.float32)])
    assert th.profile(model).bits == (240 + 64) + 40  # the zero bias: its bitmap alone
    ratios = th.profile(model).ratios(prof)
    assert ratios["params"] == 240 / 280 and ratios["bits"] == (304 + 40) / (32 * 280)


def test_a_tucker2_chain_costs_what_the_three_convs_it_stands_for_cost():
    from tfhybrid import channels, cost

    def conv_model(*convs):
        inputs = keras.Input((12, 12, 8))
        x = inputs
        for conv in convs:
            x = conv(x)
        return keras.Model(inputs, layers.Conv2D(4, 1, name="head")(x))

    model = conv_model(layers.Conv2D(16, 3, strides=2, padding="same", name="conv"))
    chain = conv_model(
        layers.Conv2D(3, 1, use_bias=False, name="first"),  # at the input's 12 x 12
        layers.Conv2D(5, 3, strides=2, padding="same", use_bias=False, name="core"),
        layers.Conv2D(16, 1, name="last"),  # at the output's 6 x 6, with the bias
    )
    model_cost = cost.CostModel.from_analysis(channels.analyze(model))
    costs = model_cost.costs(tucker={"conv": (3, 5)})
    expected = th.profile(chain)
    assert (costs["macs"], costs["params"]) == (expected.macs, expected.params)
    # By hand: 144*8*3 + 36*9*3*5 + 36*5*16 MACs, then the head's 36*16*4.
    assert costs["macs"] == 144 * 8 * 3 + 36 * 9 * 3 * 5 + 36 * 5 * 16 + 36 * 16 * 4
