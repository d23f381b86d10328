"""channel_groups: which channels are coupled, and which groups are kept whole (and why)."""

import re

import pytest
import tensorflow as tf

import tfhybrid as th

from models import lenet5, resnet_style

keras = th.keras
layers = keras.layers


def _group_of(groups, layer, role="produces"):
    found = [g for g in groups if layer in g.layers(role)]
    assert len(found) == 1, f"{layer} should {role} exactly one group, got {found}"
    return found[0]


def test_lenet_groups_in_order_with_members_and_flatten_repeats():
    groups = th.channel_groups(lenet5())
    assert [g.id for g in groups] == list(range(len(groups)))
    assert [(g.size, g.prunable) for g in groups] == [
        (1, False),
        (20, True),
        (50, True),
        (500, True),
        (10, False),
    ]
    assert "model input" in groups[0].reason and "model output 'fc2'" in groups[4].reason
    conv2 = groups[2]
    assert conv2.layers("produces") == ["conv2"]
    assert conv2.layers("passes") == ["pool2", "flatten"]
    assert conv2.layers("consumes") == ["fc1"]
    fc1_input = next(m for m in conv2.members if m.layer == "fc1")
    assert fc1_input.repeats == 16  # Flatten: 4 x 4 positions


def test_order_is_stable():
    model = resnet_style()
    first = [(g.size, g.layers()) for g in th.channel_groups(model)]
    assert first == [(g.size, g.layers()) for g in th.channel_groups(model)]


def test_residual_adds_couple_every_producer_of_a_stage():
    groups = th.channel_groups(resnet_style())
    stage1 = _group_of(groups, "stem")
    assert {"stem", "b0_c2"} <= set(stage1.layers("produces"))
    stage2 = _group_of(groups, "b1_proj")
    assert set(stage2.layers("produces")) == {"b1_proj", "b1_c2", "b2_c2"}
    assert {"b1_add", "b2_add", "b1_proj_bn", "gap"} <= set(stage2.layers("passes"))
    assert stage2.prunable
    inner = _group_of(groups, "b1_c1")
    assert inner.layers("produces") == ["b1_c1"] and inner.size == 16


def test_squeeze_excite_gate_is_coupled_to_the_gated_tensor():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, name="conv")(inputs)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    s = layers.Conv2D(4, 1, activation="relu", name="reduce")(s)
    s = layers.Conv2D(16, 1, activation="sigmoid", name="expand")(s)
    x = layers.Multiply(name="gate")([x, s])
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x))
    groups = th.channel_groups(model)
    gated = _group_of(groups, "conv")
    assert set(gated.layers("produces")) == {"conv", "expand"}
    assert gated.prunable and "reduce" in gated.layers("consumes")
    assert _group_of(groups, "reduce").prunable


def test_concatenate_records_offsets():
    inputs = keras.Input((4, 4, 3))
    a = layers.Conv2D(5, 1, name="a")(inputs)
    b = layers.Conv2D(7, 1, name="b")(inputs)
    x = layers.Concatenate(name="cat")([a, b])
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x))
    groups = th.channel_groups(model)
    offsets = {
        g.layers("produces")[0]: next(m.offset for m in g.members if m.layer == "out")
        for g in groups
        if g.layers("produces") in (["a"], ["b"])
    }
    assert offsets == {"a": 0, "b": 5}


def test_depthwise_multiplier_expands_the_group():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(4, 1, name="pw")(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=3, name="dw")(x)
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x))
    group = _group_of(th.channel_groups(model), "pw")
    member = {m.layer: m for m in group.members}
    assert group.size == 4 and member["dw"].role == "passes" and member["out"].mult == 3


@pytest.mark.filterwarnings("ignore:tfhybrid keeps the channels")
@pytest.mark.parametrize(
    "make_block,reason",
    [
        (
            lambda x: layers.Conv2D(8, 1, groups=2, name="grouped")(
                layers.Concatenate()([x[..., :4], x[..., 4:]])
            ),
            r"'__operators__.getitem' slices",
        ),
        (lambda x: tf.transpose(x, [0, 2, 1, 3]), r"tf.compat.v1.transpose|tf.transpose"),
        (lambda x: tf.math.cumsum(x, axis=-1), r"'math.cumsum' is not known to be element-wise"),
        (
            lambda x: tf.reduce_mean(x, axis=-1, keepdims=True) + x,
            r"'math.reduce_mean' reduces across channels",
        ),
        (lambda x: x[..., :4], r"'__operators__.getitem' slices or reshapes"),
        (
            lambda x: layers.LayerNormalization(axis=[1, 2, 3], name="ln")(x),
            r"'ln' \(LayerNormalization\): it normalizes over axis",
        ),
        (
            lambda x: layers.MultiHeadAttention(2, 4, name="mha")(x, layers.ReLU()(x) * 2.0),
            r"MultiHeadAttention 'mha': it attends from one tensor to another",
        ),
        (lambda x: layers.Softmax(name="sm")(x), r"'sm' \(Softmax\)"),
        (lambda x: layers.BatchNormalization(axis=1, name="bn1")(x), r"normalizes over axis"),
        (lambda x: layers.Reshape((6, 3, 16), name="rs")(x), r"'rs' \(Reshape\).*channel axis"),
        (
            lambda x: layers.MaxPooling2D(data_format="channels_first", name="cf")(x),
            r"'cf' \(MaxPooling2D\): it is not channels-last",
        ),
    ],
)
def test_ops_it_cannot_see_through_keep_their_groups_whole(make_block, reason):
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 1, name="before")(inputs)
    x = make_block(x)
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))
    group = _group_of(th.channel_groups(model), "before")
    assert not group.prunable
    assert re.search(reason, group.reason), group.reason


def test_unsupported_layers_are_named_in_a_warning():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 1, name="before")(inputs)
    x = layers.Permute((2, 1, 3), name="perm")(x)
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))
    with pytest.warns(UserWarning, match="cannot see through them: perm"):
        th.channel_groups(model)


def test_nested_models_are_analysed_through():
    inner = keras.Sequential(
        [keras.Input((5, 5, 6)), layers.BatchNormalization(name="bn"), layers.ReLU(name="r")],
        name="inner",
    )
    inputs = keras.Input((5, 5, 3))
    x = layers.Conv2D(6, 1, name="conv")(inputs)
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(inner(x)))
    group = _group_of(th.channel_groups(model), "conv")
    assert group.prunable and {"bn", "r"} <= set(group.layers("passes"))
    assert "out" in group.layers("consumes")


def test_dense_on_sequences_and_reshape_keep_channels_last():
    inputs = keras.Input((7, 12))
    x = layers.Dense(16, name="d1")(inputs)
    x = layers.Reshape((7, 1, 16), name="rs")(x)
    x = layers.Reshape((7, 16), name="rs2")(x)
    model = keras.Model(inputs, layers.Dense(3, name="d2")(x))
    group = _group_of(th.channel_groups(model), "d1")
    assert group.prunable and group.layers("passes") == ["rs", "rs2"]


def test_concatenate_along_a_spatial_axis_couples_its_inputs():
    inputs = keras.Input((4, 4, 3))
    a = layers.Conv2D(6, 1, name="a")(inputs)
    b = layers.Conv2D(6, 1, name="b")(inputs)
    x = layers.Concatenate(axis=1, name="cat")([a, b])
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x))
    groups = th.channel_groups(model)
    group = _group_of(groups, "a")
    assert group is _group_of(groups, "b") and group.size == 6 and group.prunable


def test_shared_layer_couples_all_its_calls():
    inputs = keras.Input((4, 4, 3))
    a = layers.Conv2D(6, 1, name="a")(inputs)
    b = layers.Conv2D(6, 1, name="b")(inputs)
    shared = layers.Conv2D(5, 1, name="shared")
    x = layers.Concatenate(name="cat")([shared(a), shared(b)])
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x))
    groups = th.channel_groups(model)
    assert _group_of(groups, "a") is _group_of(groups, "b")
    assert len([g for g in groups if "shared" in g.layers("produces")]) == 1


def test_elementwise_tf_ops_pass_channels_and_couple_their_operands():
    """MobileNetV3's hard-swish written with TF ops, a per-channel constant, a spatial
    mean and a product of two tensors: one group from `before` to `after`."""
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 1, name="before")(inputs)
    gate = layers.Conv2D(8, 1, name="gate")(inputs)
    x = x * (tf.nn.relu6(x + 3.0) * (1.0 / 6.0))
    x = tf.math.multiply(x, tf.constant([float(i) for i in range(8)])) * tf.sigmoid(gate)
    x = x - tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))
    groups = th.channel_groups(model)
    group = _group_of(groups, "before")
    assert group.prunable, group.reason
    assert group is _group_of(groups, "gate") and "after" in group.layers("consumes")


class ChannelScale(layers.Layer):
    """A custom per-channel scale (a user's layer, unknown to tfhybrid)."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def build(self, input_shape):
        self.scale = self.add_weight("scale", (self.channels,), initializer="random_normal")

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def _scaled_model(layer_class=ChannelScale):
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 1, name="before")(inputs)
    x = layer_class(8, name="scale")(x)
    return keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))


@pytest.fixture
def registry():
    """Restores the layer registry after a test that registers layers."""
    from tfhybrid import channels

    saved = dict(channels._RULES)
    yield
    channels._RULES.clear()
    channels._RULES.update(saved)


def test_an_undeclared_custom_layer_is_kept_whole_with_a_pointer_to_the_registry():
    with pytest.warns(UserWarning, match="cannot see through them: scale"):
        group = _group_of(th.channel_groups(_scaled_model()), "before")
    assert not group.prunable and "tfhybrid.register_layer" in group.reason


def test_a_registered_per_channel_layer_is_pruned_exactly(registry):
    th.register_layer(ChannelScale, "passes", channels_config="channels")
    model = _scaled_model()
    group = _group_of(th.channel_groups(model), "before")
    assert group.prunable and "scale" in group.layers("passes")
    remove = {group.id: [1, 4, 6]}
    pruned = th.prune_channels(model, remove)
    masked = th.prune_channels(model, remove, masked=True)
    x = tf.random.normal((2, 6, 6, 3))
    assert pruned.get_layer("scale").get_config()["channels"] == 5
    assert float(tf.reduce_max(tf.abs(pruned(x) - masked(x)))) <= 1e-5


def test_a_registered_producer_slices_with_its_own_function(registry):
    def slice_dense(layer, kept_in, kept_out):
        kernel, bias = layer.get_weights()
        if kept_in is not None:
            kernel = kernel[kept_in]
        if kept_out is not None:
            kernel, bias = kernel[:, kept_out], bias[kept_out]
        return {"units": kernel.shape[1]}, [kernel, bias]

    class MyDense(layers.Dense):
        pass

    th.register_layer(MyDense, "produces", slice_weights=slice_dense)
    inputs = keras.Input((5,))
    x = MyDense(8, name="mine")(layers.Dense(6, name="first")(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="last")(x))
    groups = th.channel_groups(model)
    first, mine = _group_of(groups, "first"), _group_of(groups, "mine")
    assert first.prunable and mine.prunable and "mine" in first.layers("consumes")
    remove = {first.id: [0, 3], mine.id: [2, 5, 7]}
    with keras.utils.custom_object_scope({"MyDense": MyDense}):
        pruned = th.prune_channels(model, remove)
        masked = th.prune_channels(model, remove, masked=True)
    x = tf.random.normal((4, 5))
    assert pruned.get_layer("mine").units == 5
    assert float(tf.reduce_max(tf.abs(pruned(x) - masked(x)))) <= 1e-5


def test_register_layer_refuses_what_it_cannot_use(registry):
    with pytest.raises(TypeError, match="takes a Keras layer class"):
        th.register_layer(object, "passes")
    with pytest.raises(ValueError, match="role='mixes' is not one of"):
        th.register_layer(ChannelScale, "mixes")
    with pytest.raises(ValueError, match="needs slice_weights"):
        th.register_layer(ChannelScale, "produces")


def test_a_passes_declaration_that_contradicts_the_shapes_is_an_error(registry):
    class Widen(layers.Layer):
        def call(self, x):
            return tf.concat([x, x], axis=-1)

    th.register_layer(Widen, "passes")
    inputs = keras.Input((6, 6, 3))
    x = Widen(name="widen")(layers.Conv2D(8, 1, name="before")(inputs))
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))
    with pytest.raises(ValueError, match=r"'widen' \(Widen\) is registered as 'passes'.*8 input"):
        th.channel_groups(model)


def test_a_grouped_convolution_prunes_whole_groups_with_their_inputs():
    """RegNet's 3 x 3 conv with a squeeze-excite gate: units of 4 input / 6 output channels."""
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 1, name="before")(inputs)
    x = layers.Conv2D(12, 3, padding="same", groups=2, name="grouped")(x)
    gate = layers.Conv2D(12, 1, activation="sigmoid", name="excite")(inputs)
    x = layers.Multiply(name="gated")([x, gate])
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="after")(x))
    groups = th.channel_groups(model)
    units = _group_of(groups, "before")
    assert units.prunable and units.size == 2
    member = {m.layer: m for m in units.members}
    assert member["before"].mult == 4 and member["excite"].mult == 6
    assert "after" in units.layers("consumes")
    pruned = th.prune_channels(model, {units.id: [0]})
    masked = th.prune_channels(model, {units.id: [0]}, masked=True)
    assert pruned.get_layer("grouped").groups == 1 and pruned.get_layer("grouped").filters == 6
    x = tf.random.normal((2, 6, 6, 3))
    assert float(tf.reduce_max(tf.abs(pruned(x) - masked(x)))) <= 1e-5
