"""techniques.magnitude: L1-norm channel choice."""

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid.techniques import magnitude

from models import lenet5, resnet_style, small_vit

keras = th.keras


def _group(model, producer):
    return next(g for g in th.channel_groups(model) if producer in g.layers("produces"))


def test_l1_removal_drops_the_smallest_filters():
    model = lenet5()
    kernel = model.get_layer("conv1").kernel.numpy()
    scale = np.arange(1, 21, dtype=np.float32)[::-1]  # filter i has norm ~ 20 - i
    model.get_layer("conv1").kernel.assign(np.sign(kernel) * scale)
    removal = magnitude.l1_removal(model, 0.25)
    np.testing.assert_array_equal(removal[_group(model, "conv1").id], [15, 16, 17, 18, 19])
    assert len(removal[_group(model, "fc1").id]) == 125


def test_residual_groups_sum_the_norms_of_all_producers():
    model = resnet_style()
    group = _group(model, "b1_proj")
    expected = sum(
        np.abs(model.get_layer(n).kernel.numpy()).reshape(-1, 16).sum(0)
        for n in group.layers("produces")
    )
    np.testing.assert_allclose(magnitude.channel_l1_norms(model)[group.id], expected, rtol=1e-6)


def test_l1_removal_keeps_one_channel_and_rejects_bad_fractions():
    model = lenet5()
    removal = magnitude.l1_removal(model, 0.999)
    sizes = {g.id: g.size for g in th.channel_groups(model)}
    assert removal and all(len(v) == sizes[gid] - 1 for gid, v in removal.items())
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got 1.0"):
        magnitude.l1_removal(model, 1.0)


def test_l1_removal_keeps_multiples_of_round_to():
    model = lenet5()
    removal = magnitude.l1_removal(model, 0.75, round_to=8)
    sizes = {g.id: g.size for g in th.channel_groups(model)}
    kept = {gid: sizes[gid] - len(v) for gid, v in removal.items()}
    assert kept == {
        _group(model, "conv1").id: 8,  # 20 * 0.25 = 5 -> 8
        _group(model, "conv2").id: 16,  # 12.5 -> 13 -> 16
        _group(model, "fc1").id: 128,  # 125 -> 128
    }
    with pytest.raises(ValueError, match="round_to must be >= 1"):
        magnitude.l1_removal(model, 0.5, round_to=0)


def test_an_attention_head_is_scored_by_its_slice_of_the_output_projection():
    model = small_vit(size=16, width=32, depth=1)
    attention = model.get_layer("block0_attention")
    heads = next(g for g in th.channel_groups(model) if g.key() == ("block0_attention/heads",))
    output_kernel = attention.get_weights()[6]  # (heads, value_dim, out)
    expected = np.abs(output_kernel).sum(axis=(1, 2))
    np.testing.assert_allclose(magnitude.channel_l1_norms(model)[heads.id], expected, rtol=1e-6)


def test_a_separable_convolution_is_scored_by_its_pointwise_kernel():
    inputs = keras.Input((8, 8, 4))
    outputs = keras.layers.SeparableConv2D(8, 3, name="separable")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(outputs)))
    norms = magnitude.channel_l1_norms(model)[_group(model, "separable").id]
    pointwise = model.get_layer("separable").pointwise_kernel.numpy()
    np.testing.assert_allclose(norms, np.abs(pointwise).sum(axis=(0, 1, 2)), rtol=1e-6)
