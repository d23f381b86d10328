"""Budget: validation and the differentiable penalty."""

import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import budget


@pytest.mark.parametrize(
    "kwargs",
    [{"macs": 0.0}, {"macs": 1.5}, {"params": -0.1}, {"bits": 2.0}, {"latency": 0.0}, {}],
)
def test_budget_outside_unit_interval_is_refused(kwargs):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]|needs macs=..., params=..., bits"):
        th.Budget(**kwargs)


def test_met_by_checks_every_constrained_quantity():
    both = th.Budget(macs=0.25, params=0.5)
    assert both.targets() == {"macs": 0.25, "params": 0.5}
    assert both.met_by({"macs": 0.25, "params": 0.4})
    assert not both.met_by({"macs": 0.26, "params": 0.4})
    assert th.Budget(params=0.5).met_by({"macs": 1.0, "params": 0.5})
    bits = th.Budget(macs=0.5, bits=1 / 16)
    assert bits.targets() == {"macs": 0.5, "bits": 1 / 16}
    assert bits.met_by({"macs": 0.5, "params": 1.0, "bits": 0.06})
    assert not bits.met_by({"macs": 0.5, "params": 0.1, "bits": 0.07})
    latency = th.Budget(macs=0.5, latency=0.4)
    assert latency.targets() == {"macs": 0.5, "latency": 0.4}
    assert not latency.met_by({"macs": 0.5, "params": 1.0, "bits": 1.0, "latency": 0.41})


def test_penalty_is_zero_inside_and_grows_outside():
    b = th.Budget(macs=0.5)
    ratio = tf.Variable(0.75)
    with tf.GradientTape() as tape:
        value = budget.penalty({"macs": ratio}, b)
    assert float(value) == pytest.approx(0.5)
    assert float(tape.gradient(value, ratio)) == pytest.approx(2.0)
    assert float(budget.penalty({"macs": tf.constant(0.4)}, b)) == 0.0
