"""plan: plain layers, merging plans from several techniques, and what strip makes of them."""

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid import plan, surgery

from models import lenet5

keras = th.keras


def test_a_plain_layer_calls_a_new_layer_with_its_weights():
    model = lenet5()
    spec = plan.PlainLayer.of(model.get_layer("fc2"))
    x = np.random.default_rng(0).normal(size=(2, 500)).astype(np.float32)
    call = spec.call()
    call(x)  # builds the layer; its weights are set once it is built (as graph.rebuild calls)
    np.testing.assert_allclose(call(x), model.get_layer("fc2")(x), rtol=1e-6)
    assert spec.call() is not spec.call()  # a fresh layer each time


def test_merging_keeps_every_decision_and_its_source():
    first = plan.Plan.of("df", remove={("conv1",): [0, 3]}, ranks={"fc1": 8})
    second = plan.Plan.of("sparse", replace={"fc2": plan.IDENTITY})
    merged = plan.merge([first, second])
    assert merged.ranks == {"fc1": 8} and merged.replace == {"fc2": plan.IDENTITY}
    np.testing.assert_array_equal(merged.remove[("conv1",)], [0, 3])
    assert merged.sources == {("conv1",): "df", ("rank", "fc1"): "df", "fc2": "sparse"}


@pytest.mark.parametrize(
    "other,message",
    [
        (plan.Plan.of("b", replace={"fc1": plan.IDENTITY}), r"layer 'fc1': a and b"),
        (plan.Plan.of("b", ranks={"fc1": 3}), r"the rank of layer 'fc1': a and b"),
        (plan.Plan.of("b", remove={("conv1",): [1]}), r"the channel group produced by \['conv1'\]"),
    ],
)
def test_two_plans_deciding_the_same_thing_are_refused(other, message):
    mine = plan.Plan.of(
        "a", replace={"fc1": plan.IDENTITY}, ranks={"fc1": 2}, remove={("conv1",): [0]}
    )
    with pytest.raises(ValueError, match=f"Two techniques decide {message}"):
        mine.merge(other)


def test_strip_carries_out_a_plan_exactly():
    model = lenet5()
    decided = plan.Plan.of("mine", remove={("conv1",): [0, 1, 2]}, ranks={"fc1": 20})
    small = surgery.strip(model, decided)
    assert small.get_layer("conv1").filters == 17
    assert [la.name for la in small.layers if la.name.startswith("fc1")] == ["fc1_u", "fc1_v"]
    reference = th.factorize(th.prune_channels(model, {1: [0, 1, 2]}), {"fc1": 20})
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(small(x), reference(x), rtol=1e-5, atol=1e-6)
