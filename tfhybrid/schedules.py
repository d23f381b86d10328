"""Schedules of the compression search: temperatures and penalty weights by step.

A schedule maps the compression step (an integer variable that every training
step advances, like the optimizer's `iterations`) to a value. Schedules are
serializable, so a saved model carries them and resumes where it stopped.
"""

from __future__ import annotations

import tensorflow as tf

from tfhybrid._keras import keras


class Schedule:
    """Base class: `schedule(step)` -> float32 tensor; serializable by its config."""

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> Schedule:
        return cls(**config)


@keras.utils.register_keras_serializable(package="tfhybrid")
class ExponentialDecay(Schedule):
    """From `start` to `end` geometrically over `steps` steps, then `end`.

    Args:
        start: value at step 0 (> 0).
        end: value from step `steps` on (> 0).
        steps: length of the decay (>= 1).
    """

    def __init__(self, start: float, end: float, steps: int):
        if start <= 0 or end <= 0 or steps < 1:
            raise ValueError(
                f"ExponentialDecay needs start > 0, end > 0 and steps >= 1; "
                f"got start={start}, end={end}, steps={steps}."
            )
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        progress = tf.clip_by_value(tf.cast(step, tf.float32) / self.steps, 0.0, 1.0)
        return self.start * tf.pow(self.end / self.start, progress)

    def get_config(self) -> dict:
        return {"start": self.start, "end": self.end, "steps": self.steps}


@keras.utils.register_keras_serializable(package="tfhybrid")
class LinearRamp(Schedule):
    """From `start` to `end` linearly between `begin` and `begin + steps`.

    Args:
        start: value up to step `begin`.
        end: value from step `begin + steps` on.
        steps: length of the ramp (>= 1).
        begin: first step of the ramp.
    """

    def __init__(self, start: float, end: float, steps: int, begin: int = 0):
        if steps < 1:
            raise ValueError(f"LinearRamp needs steps >= 1, got {steps}.")
        self.start, self.end = float(start), float(end)
        self.steps, self.begin = int(steps), int(begin)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        progress = (tf.cast(step, tf.float32) - self.begin) / self.steps
        return self.start + (self.end - self.start) * tf.clip_by_value(progress, 0.0, 1.0)

    def get_config(self) -> dict:
        return {"start": self.start, "end": self.end, "steps": self.steps, "begin": self.begin}


def serialize(schedule: Schedule) -> dict:
    """A JSON-able description of `schedule`."""
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config: dict | Schedule) -> Schedule:
    """The schedule described by `serialize`'s output (a schedule passes through)."""
    if isinstance(config, Schedule):
        return config
    classes = {cls.__name__: cls for cls in (ExponentialDecay, LinearRamp)}
    name = config.get("class_name")
    if name not in classes:
        raise ValueError(f"Unknown schedule {name!r}; known: {sorted(classes)}.")
    return classes[name].from_config(dict(config["config"]))
