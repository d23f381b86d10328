"""prune_channels and factorize: exactness on real architectures, SVD identity, errors."""

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th

from models import (
    APPLICATIONS,
    MODERN,
    assert_unchanged,
    lenet5,
    max_relative_diff,
    nested_model,
    random_removal,
    randomize_batchnorm,
    resnet_style,
    weights_snapshot,
)

keras = th.keras
layers = keras.layers

ARCHITECTURES = {"LeNet5": lenet5, "ResNetStyle": resnet_style, **APPLICATIONS, **MODERN}


def _inputs(model, batch=2, seed=1):
    shape = (batch,) + tuple(model.input_shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_masked_and_pruned_models_compute_the_same_function(name):
    model = randomize_batchnorm(ARCHITECTURES[name]())
    remove = random_removal(model, 0.25)
    assert remove, "the architecture should have prunable groups"

    masked = th.prune_channels(model, remove, masked=True)
    pruned = th.prune_channels(model, remove)

    assert max_relative_diff(masked, pruned, _inputs(model)) <= 1e-4
    assert pruned.count_params() < model.count_params()
    assert th.profile(pruned).macs < th.profile(model).macs
    assert masked.count_params() == model.count_params()


def test_pruned_lenet_costs_match_hand_count():
    model = lenet5()
    groups = th.channel_groups(model)
    conv1, conv2, fc1 = (
        next(g for g in groups if g.layers("produces") == [n]) for n in ("conv1", "conv2", "fc1")
    )
    pruned = th.prune_channels(
        model, {conv1.id: range(5), conv2.id: range(0, 20, 2), fc1.id: range(100, 200)}
    )
    c1, c2, f1 = 15, 40, 400
    macs = 24 * 24 * 25 * 1 * c1 + 8 * 8 * 25 * c1 * c2 + 16 * c2 * f1 + f1 * 10
    params = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (16 * c2 * f1 + f1) + (f1 * 10 + 10)
    assert th.profile(pruned).macs == macs
    assert th.profile(pruned).params == params == pruned.count_params()
    assert pruned.get_layer("fc1").kernel.shape == (16 * c2, f1)


def test_pruned_weights_are_the_kept_slices():
    model = lenet5()
    conv1 = next(g for g in th.channel_groups(model) if g.layers("produces") == ["conv1"])
    pruned = th.prune_channels(model, {conv1.id: [0, 3]})
    kept = [i for i in range(20) if i not in (0, 3)]
    np.testing.assert_array_equal(
        pruned.get_layer("conv1").kernel.numpy(), model.get_layer("conv1").kernel.numpy()[..., kept]
    )
    np.testing.assert_array_equal(
        pruned.get_layer("conv2").kernel.numpy(),
        model.get_layer("conv2").kernel.numpy()[:, :, kept, :],
    )


def _squeeze_excite_model():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    s = layers.GlobalAveragePooling2D(name="se_pool")(x)
    s = layers.Reshape((1, 1, 16), name="se_reshape")(s)
    s = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    x = layers.Multiply(name="se_gate")([x, s])
    x = layers.PReLU(shared_axes=[1, 2], name="prelu")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = layers.SeparableConv2D(12, 3, depth_multiplier=2, name="sep")(x)
    y = layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="deconv")(x)
    z = layers.Conv2D(6, 3, strides=2, padding="same", name="side")(y)
    x = layers.Concatenate(name="cat")([layers.UpSampling2D(name="up")(z), y])
    x = layers.ZeroPadding2D(name="pad")(x)
    x = layers.Cropping2D(1, name="crop")(x)
    x = layers.Dropout(0.5, name="drop")(x)
    x = layers.Reshape((-1, 12), name="tokens")(x)
    x = layers.Dense(8, name="dense3d")(x)
    x = layers.LeakyReLU(name="leaky")(x)
    x = layers.Flatten(name="flat")(x)
    outputs = layers.Dense(5, name="out")(x)
    return keras.Model(inputs, outputs)


def _spatial_concat_model():
    """Concatenating along height couples the channels of both inputs, like an Add."""
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(6, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(6, 1, name="b")(inputs)
    x = layers.Concatenate(axis=1, name="cat")([a, b])
    x = layers.Conv2D(5, 3, name="after")(layers.ReLU()(x))
    return keras.Model(inputs, layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("build", [_squeeze_excite_model, nested_model, _spatial_concat_model])
def test_exact_on_every_supported_construct(build):
    model = randomize_batchnorm(build())
    remove = random_removal(model, 0.5, seed=3)
    masked = th.prune_channels(model, remove, masked=True)
    pruned = th.prune_channels(model, remove)
    assert max_relative_diff(masked, pruned, _inputs(model)) <= 1e-4
    assert pruned.count_params() < model.count_params()


@pytest.mark.parametrize("name", sorted(MODERN))
def test_modern_families_are_prunable_inside(name):
    """Groups touching neither the input nor the output: prunable through TF ops,
    LayerScale, grouped convs, LayerNormalization and self-attention."""
    groups = th.channel_groups(MODERN[name]())
    edge = ("it touches the model input", "it feeds the model output")
    inner = [g for g in groups if not (g.reason or "").startswith(edge)]
    assert inner and all(g.prunable for g in inner), [g.reason for g in inner if not g.prunable]


def test_input_model_is_not_modified():
    model = resnet_style()
    snapshot, config = weights_snapshot(model), model.get_config()
    th.prune_channels(model, random_removal(model, 0.5))
    th.prune_channels(model, random_removal(model, 0.5), masked=True)
    th.factorize(model, {"b1_c1": 2})
    assert_unchanged(model, snapshot, config)


# -- factorize ----------------------------------------------------------------------------


def _truncated(matrix, rank):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_factorized_dense_equals_truncated_svd():
    inputs = keras.Input((6, 40))
    outputs = layers.Dense(30, activation="tanh", name="fc")(inputs)
    model = keras.Model(inputs, outputs)
    model.get_layer("fc").bias.assign(np.linspace(-1, 1, 30))
    small = th.factorize(model, {"fc": 7})

    kernel, bias = model.get_layer("fc").get_weights()
    x = _inputs(model)
    expected = np.tanh(x @ _truncated(kernel, 7) + bias)
    np.testing.assert_allclose(small(x).numpy(), expected, atol=1e-5)
    assert small.get_layer("fc_u").kernel.shape == (40, 7)
    assert small.get_layer("fc_v").kernel.shape == (7, 30)
    assert not small.get_layer("fc_u").use_bias


@pytest.mark.parametrize(
    "strides,dilation,padding", [(1, 1, "same"), (2, 1, "valid"), (1, 2, "same"), (2, 1, "same")]
)
def test_factorized_conv_equals_truncated_svd(strides, dilation, padding):
    inputs = keras.Input((11, 11, 5))
    conv = layers.Conv2D(
        12,
        3,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        activation="relu",
        name="conv",
    )
    model = keras.Model(inputs, conv(inputs))
    conv.bias.assign(np.linspace(-0.5, 0.5, 12))
    small = th.factorize(model, {"conv": 4})

    kernel, bias = conv.get_weights()
    reconstructed = _truncated(kernel.reshape(-1, 12), 4).reshape(kernel.shape)
    x = _inputs(model)
    expected = tf.nn.relu(
        tf.nn.conv2d(x, reconstructed, strides=strides, padding=padding.upper(), dilations=dilation)
        + bias
    )
    np.testing.assert_allclose(small(x).numpy(), expected.numpy(), atol=1e-5)
    first, second = small.get_layer("conv_u"), small.get_layer("conv_v")
    assert (first.filters, first.strides, first.dilation_rate, first.padding) == (
        4,
        (strides, strides),
        (dilation, dilation),
        padding,
    )
    assert second.kernel_size == (1, 1)
    assert th.profile(small).macs < th.profile(model).macs


def test_factorize_refuses_rank_that_does_not_reduce_macs_unless_forced():
    inputs = keras.Input((10,))
    model = keras.Model(inputs, layers.Dense(10, name="fc")(inputs))
    with pytest.raises(ValueError, match=r"does not reduce its MACs.*force=True"):
        th.factorize(model, {"fc": 6})
    forced = th.factorize(model, {"fc": 6}, force=True)
    assert forced.get_layer("fc_u").units == 6


# -- bad input ------------------------------------------------------------------------------


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = layers.Dense(3)

    def call(self, x):
        return self.fc(x)


def test_subclassed_model_is_refused_with_advice():
    model = _Subclassed()
    model(np.zeros((1, 4), np.float32))
    for call in (
        th.channel_groups,
        th.profile,
        lambda m: th.prune_channels(m, {}),
        lambda m: th.factorize(m, {"dense": 1}),
    ):
        with pytest.raises(TypeError, match="subclassed.*functional API"):
            call(model)


def _lenet_group(model, producer):
    return next(g for g in th.channel_groups(model) if g.layers("produces") == [producer])


@pytest.mark.parametrize(
    "remove,error,message",
    [
        (lambda g: {g.id: range(20)}, ValueError, r"all 20 channels of channel group \d+.*conv1"),
        (lambda g: {g.id: [3, 20]}, ValueError, r"index 20 is out of range"),
        (lambda g: {g.id: [-1]}, ValueError, r"index -1 is out of range"),
        (lambda g: {g.id: [2, 2, 5]}, ValueError, r"\[2\] are listed twice"),
        (lambda g: {0: [0]}, ValueError, r"group 0 is not prunable: .*model input"),
        (lambda g: {99: [0]}, KeyError, r"group 99 does not exist.*groups 0\.\.4"),
        (lambda g: [1, 2], TypeError, r"must map channel group ids"),
    ],
)
def test_bad_removals_raise_clear_errors(remove, error, message):
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    with pytest.raises(error, match=message):
        th.prune_channels(model, remove(_lenet_group(model, "conv1")))
    assert_unchanged(model, snapshot, config)


@pytest.mark.parametrize(
    "ranks,error,message",
    [
        ({"nope": 3}, KeyError, r"No layer named 'nope'.*\['conv1', 'conv2', 'fc1', 'fc2'\]"),
        ({"pool1": 3}, TypeError, r"'pool1' is a MaxPooling2D"),
        ({"fc1": 500}, ValueError, r"Rank 500 .*'fc1'.*800 x 500.*full rank 500"),
        ({"fc2": 0}, ValueError, r"Rank 0 .*'fc2'"),
        ({"fc2": 2.5}, ValueError, r"Rank 2.5 .*'fc2'"),
    ],
)
def test_bad_ranks_raise_clear_errors(ranks, error, message):
    model = lenet5()
    snapshot, config = weights_snapshot(model), model.get_config()
    with pytest.raises(error, match=message):
        th.factorize(model, ranks)
    assert_unchanged(model, snapshot, config)


def test_factorize_refuses_a_name_its_halves_would_clash_with():
    inputs = keras.Input((16,))
    x = layers.Dense(16, name="fc")(inputs)
    model = keras.Model(inputs, layers.Dense(16, name="fc_u")(x))
    with pytest.raises(ValueError, match=r"Cannot factorize 'fc': a layer named 'fc_u' exists"):
        th.factorize(model, {"fc": 2})
