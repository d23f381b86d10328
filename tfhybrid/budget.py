"""The budget: what share of the original model's MACs, parameters, storage and/or
measured latency may remain."""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Budget:
    """Fractions of the original model to keep, e.g. `Budget(macs=0.25)`.

    Args:
        macs: share of the original multiply-accumulates, in (0, 1].
        params: share of the original parameters (non-zero ones), in (0, 1].
        bits: share of the original float32 storage, in (0, 1] (see `cost.CostModel.costs`
            for what a sparse or quantized weight stores).
        latency: share of the original model's latency, in (0, 1], as `latency_table`
            predicts it from its measurements (see `tfhybrid.latency`).
        latency_table: a `tfhybrid.latency.LatencyTable`, or the path of one saved by
            `python -m tfhybrid latency-table`; needed with `latency`.

    Raises:
        ValueError: if none is given or one is outside (0, 1].
    """

    macs: float | None = None
    params: float | None = None
    bits: float | None = None
    latency: float | None = None
    latency_table: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.targets():
            raise ValueError(
                "Budget needs macs=..., params=..., bits=... or latency=..., e.g. "
                "Budget(macs=0.25)."
            )
        for name, value in self.targets().items():
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(
                    f"Budget({name}={value!r}) is outside (0, 1]: it is the share of the "
                    f"original model's {name} to keep, e.g. {name}=0.25 keeps a quarter."
                )

    def targets(self) -> dict[str, float]:
        """{"macs": fraction, ...} for the quantities constrained."""
        given = (
            ("macs", self.macs),
            ("params", self.params),
            ("bits", self.bits),
            ("latency", self.latency),
        )
        return {k: v for k, v in given if v is not None}

    def met_by(self, ratios: dict[str, float]) -> bool:
        """True if every constrained ratio (new / original) is within its fraction."""
        return all(ratios[k] <= v + 1e-12 for k, v in self.targets().items())

    def get_config(self) -> dict:
        """The targets (a latency table is saved with the cost model that reads it)."""
        return {
            "macs": self.macs,
            "params": self.params,
            "bits": self.bits,
            "latency": self.latency,
        }


def penalty(ratios: dict[str, Any], budget: Budget) -> tf.Tensor:
    """How far soft ratios exceed the budget: sum of relu(ratio / target - 1).

    Args:
        ratios: "macs"/"params"/"bits"/"latency" -> current (soft) ratio to the original.
        budget: the targets.

    Returns:
        A scalar tensor, zero when the budget is met.
    """
    terms = [tf.nn.relu(ratios[k] / v - 1.0) for k, v in budget.targets().items()]
    return tf.add_n(terms)
