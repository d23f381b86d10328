"""Schedules: values by step and serialization."""

import pytest

from tfhybrid import schedules


def test_exponential_decay_goes_from_start_to_end():
    s = schedules.ExponentialDecay(1.0, 0.01, 100)
    assert [round(float(s(k)), 6) for k in (0, 50, 100, 500)] == [1.0, 0.1, 0.01, 0.01]


def test_linear_ramp_waits_then_ramps():
    s = schedules.LinearRamp(0.0, 4.0, steps=10, begin=5)
    assert [float(s(k)) for k in (0, 5, 10, 15, 99)] == [0.0, 0.0, 2.0, 4.0, 4.0]


def test_round_trip_and_bad_arguments():
    for s in (schedules.ExponentialDecay(2.0, 0.5, 7), schedules.LinearRamp(1.0, 3.0, 4, 2)):
        again = schedules.deserialize(schedules.serialize(s))
        assert type(again) is type(s) and again.get_config() == s.get_config()
    with pytest.raises(ValueError, match="start > 0"):
        schedules.ExponentialDecay(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="Unknown schedule 'Cosine'"):
        schedules.deserialize({"class_name": "Cosine", "config": {}})
