"""docs/techniques.md: its complete custom technique runs as written, alone and stacked."""

import pathlib
import re

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid import plan
from tfhybrid.techniques import base

from models import fit_search, lenet5

keras = th.keras
_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "techniques.md"


@pytest.fixture(scope="module")
def example() -> dict:
    """The namespace the doc's first code block defines (FixedRanks, LowRankDense)."""
    code = re.findall(r"```python\n(.*?)```", _DOC.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(_DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_the_documented_technique_trains_and_strips_to_its_truncated_svd(example, tmp_path):
    model = lenet5()
    compressed = th.hybrid_compress(
        model, th.Budget(macs=0.9), [example["FixedRanks"]({"fc1": 32})], search_steps=4
    )
    fc1 = compressed.get_layer("fc1")
    kernel = model.get_layer("fc1").get_weights()[0]
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    truncated = (u[:, :32] * s[:32]) @ vt[:32]
    np.testing.assert_allclose(fc1.u.numpy() @ fc1.v.numpy(), truncated, atol=1e-5)
    x = fit_search(compressed, epochs=2, n=32, batch_size=8)
    small = th.strip(compressed)
    assert [la.name for la in small.layers if la.name.startswith("fc1")] == ["fc1_u", "fc1_v"]
    assert small.get_layer("fc1_u").units == 32
    np.testing.assert_allclose(small(x[:4]), compressed(x[:4]), rtol=1e-4, atol=1e-5)
    path = str(tmp_path / "custom.keras")
    compressed.save(path)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert [t.name for t in loaded.techniques] == ["fixed_ranks"]


def test_the_documented_technique_stacks_with_df_under_one_budget(example):
    model = lenet5()
    techniques = [th.DF(ranks=False), example["FixedRanks"]({"fc1": 32})]
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5), techniques, search_steps=4)
    x = fit_search(compressed, epochs=2, n=32, batch_size=8)
    small = th.strip(compressed)
    scale = np.abs(compressed(x[:4]).numpy()).max()
    np.testing.assert_allclose(small(x[:4]), compressed(x[:4]), atol=1e-4 * scale)
    assert th.profile(small).macs <= 0.5 * th.profile(model).macs
    with pytest.raises(ValueError, match="'fc1' is claimed by two techniques"):
        th.hybrid_compress(model, th.Budget(macs=0.5), [th.DF(), techniques[1]])


def test_a_technique_needs_a_name_and_unknown_names_are_refused():
    class Nameless(base.Technique):
        pass

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        th.register_technique(Nameless)
    with pytest.raises(ValueError, match=r"Unknown technique 'nope'.*register_technique"):
        base.deserialize({"name": "nope", "config": {}})
    with pytest.raises(TypeError, match="takes tfhybrid techniques"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), ["df"])


def test_a_stack_without_any_training_time_layer_is_refused():
    @th.register_technique
    class Idle(base.Technique):
        name = "idle_for_tests"

        def get_config(self):
            return {}

        def select(self, setup):
            return {}

        def layers_of(self, model):
            return []

        def plan(self, model):
            return plan.Plan()

    with pytest.raises(ValueError, match=r"No technique of \['idle_for_tests'\] made a training"):
        th.hybrid_compress(lenet5(), th.Budget(macs=0.5), [Idle()])
