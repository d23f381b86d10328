"""A measured latency table, the cost form behind `Budget(latency=...)`.

The table holds each layer's LiteRT latency over a grid of kept input and output
channels, measured where the model will run
(`tfhybrid.export.latency_table.measure_latency_table`, or `python -m tfhybrid
latency-table`), and the rest of the model's time as one constant. The cost model
interpolates it bilinearly in the (soft) channel counts and ranks that a search
decides, so a latency budget is differentiable like a MAC budget, and follows what the
runtime does rather than what the MACs promise (an int8 1 x 1 convolution's time, for
one, follows its pixels more than its channels).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

#: The file format's version, written into every table.
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LayerLatency:
    """One layer's latency in ms over a grid of kept channels.

    Attributes:
        cin: input channel counts, ascending, the layer's full count last.
        cout: output channel counts, ascending, the full count last; for a depthwise
            convolution, whose outputs follow its inputs, just its full count.
        ms: `ms[i][j]`: the layer with `cin[i]` inputs and `cout[j]` outputs.
        split: for a layer that rank search may split in two: `split[i][j]` is its
            second factor (a 1 x 1 convolution or Dense from `cout[i]` components to
            `cout[j]` outputs, at the output's positions); its first factor is the
            layer with `cout[i]` outputs (`ms`). None for other layers.
    """

    cin: tuple[int, ...]
    cout: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]
    split: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        for name, grid in (("cin", self.cin), ("cout", self.cout)):
            if not grid or list(grid) != sorted(set(grid)) or grid[0] < 1:
                raise ValueError(f"LayerLatency.{name} must ascend from >= 1, got {grid}.")
        shape = (len(self.cin), len(self.cout))
        if np.shape(self.ms) != shape:
            raise ValueError(f"LayerLatency.ms has shape {np.shape(self.ms)}, not {shape}.")
        if self.split is not None and np.shape(self.split) != (len(self.cout),) * 2:
            raise ValueError(
                f"LayerLatency.split has shape {np.shape(self.split)}, not {(len(self.cout),) * 2}."
            )

    def scaled(self, factor: float) -> LayerLatency:
        """This layer's times multiplied by `factor`."""

        def times(rows):
            return None if rows is None else tuple(tuple(v * factor for v in r) for r in rows)

        return LayerLatency(self.cin, self.cout, times(self.ms), times(self.split))

    def at(self, cin: float, cout: float) -> float:
        """The interpolated latency (ms) with `cin` inputs and `cout` outputs."""
        ms = np.asarray(self.ms, float)
        return float(interpolate(ms, (self.cin, self.cout), (cin, cout), NumpyOps))


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """A model's measured latency: per layer over kept channels, plus a constant rest.

    Attributes:
        layers: layer name -> its `LayerLatency`.
        whole_ms: the whole model's median latency, as measured.
        rest_ms: the time of the ops it counts as constant (adds, pooling, padding,
            (de)quantization, and layers it does not measure).
        quantize: "none" (float32) or "int8" (full-integer), as the model was converted.
        threads: the interpreter's threads.
        untimed: the layers that multiply by weights but are left in `rest_ms` (kinds
            the table does not measure: their cost does not change with the search).
        in_graph_scale: the factor by which the layers' times alone were multiplied
            so that the table adds up to `whole_ms` (see
            `tfhybrid.export.latency_table`).
        machine: where it was measured (free text).
    """

    layers: dict[str, LayerLatency]
    whole_ms: float
    rest_ms: float
    quantize: str
    threads: int
    untimed: tuple[str, ...] = ()
    in_graph_scale: float = 1.0
    machine: str = ""

    def full_ms(self) -> float:
        """The latency the table predicts for the model as measured (every layer whole)."""
        return self.rest_ms + sum(lat.ms[-1][-1] for lat in self.layers.values())

    def get_config(self) -> dict:
        """The table as JSON-able data (`from_config` reads it back)."""
        config = dataclasses.asdict(self)
        config["format"] = FORMAT
        return config

    @classmethod
    def from_config(cls, config: dict) -> LatencyTable:
        config = dict(config)
        if config.pop("format", None) != FORMAT:
            raise ValueError(
                f"Not a tfhybrid latency table of format {FORMAT}; measure it again with "
                "`python -m tfhybrid latency-table`."
            )
        layers = {
            name: LayerLatency(
                tuple(lat["cin"]),
                tuple(lat["cout"]),
                tuple(map(tuple, lat["ms"])),
                None if lat["split"] is None else tuple(map(tuple, lat["split"])),
            )
            for name, lat in config.pop("layers").items()
        }
        config["untimed"] = tuple(config.get("untimed", ()))
        return cls(layers=layers, **config)

    def save(self, path: str | pathlib.Path) -> None:
        """Writes the table as JSON."""
        pathlib.Path(path).write_text(json.dumps(self.get_config(), indent=1))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> LatencyTable:
        """Reads a table that `save` (or `python -m tfhybrid latency-table`) wrote.

        Raises:
            ValueError: if the file is not such a table.
        """
        try:
            return cls.from_config(json.loads(pathlib.Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a tfhybrid latency table ({error}).") from error


def as_table(table: LatencyTable | str | pathlib.Path) -> LatencyTable:
    """`table`, read from its file if it is a path."""
    return table if isinstance(table, LatencyTable) else LatencyTable.load(table)


def hat_weights(grid: Any, x: Any, ops: Any) -> Any:
    """Piecewise-linear interpolation weights of `x` on `grid` (clamped to its ends).

    Args:
        grid: (..., G) ascending points (padding past a grid's last real point gets
            weight 0 once `x` is clamped to that point, see `pad_grid`).
        x: values, broadcastable to grid's shape without its last axis.
        ops: `NumpyOps` or the cost model's tensor operations (minimum, maximum).

    Returns:
        (..., G) weights, summing to 1: `sum(weights * values)` interpolates.
    """
    lower = np.concatenate([grid[..., :1] - 1.0, grid[..., :-1]], -1)
    upper = np.concatenate([grid[..., 1:], grid[..., -1:] + 1.0], -1)
    rising = (x[..., None] - lower) / (grid - lower)
    falling = (upper - x[..., None]) / (upper - grid)
    return ops.maximum(ops.minimum(ops.minimum(rising, falling), 1.0), 0.0)


def interpolate(ms: Any, grids: tuple, at: tuple, ops: Any, highs: tuple | None = None) -> Any:
    """Bilinear interpolation of `ms` (..., I, J) on its grids at (cin, cout).

    Values outside a grid take its nearest end (a table measured from 1 channel up
    covers every count a search can reach).

    Args:
        ms: (..., I, J) values.
        grids: (cin grid (..., I), cout grid (..., J)), ascending.
        at: (cin, cout), broadcastable to the grids' shapes without their last axis.
        ops: `NumpyOps` or the cost model's tensor operations.
        highs: each grid's last real point where grids are padded (see `pad_grid`);
            by default each grid's last point.

    Returns:
        (...) interpolated values.
    """
    grids = [np.asarray(grid, float) for grid in grids]
    highs = highs or [grid[..., -1] for grid in grids]
    rows, cols = (
        hat_weights(grid, ops.clip(x, grid[..., 0], high), ops)
        for grid, x, high in zip(grids, at, highs)
    )
    return ops.sum(ops.sum(ms * rows[..., :, None] * cols[..., None, :]))


def pad_grid(grid: tuple, size: int) -> list[float]:
    """`grid` lengthened to `size` points, one channel apart past its last: once values
    are clamped to the last real point, the added points weigh nothing."""
    return [*map(float, grid), *(grid[-1] + k for k in range(1, size - len(grid) + 1))]


def pad_values(ms: tuple, rows: int, cols: int) -> np.ndarray:
    """`ms` (I, J) padded to (rows, cols) by repeating its last row and column."""
    ms = np.asarray(ms, float)
    return np.pad(ms, ((0, rows - ms.shape[0]), (0, cols - ms.shape[1])), mode="edge")


class NumpyOps:
    """The array operations `interpolate` uses, on numbers and numpy arrays."""

    clip = staticmethod(np.clip)
    minimum, maximum = staticmethod(np.minimum), staticmethod(np.maximum)
    sum = staticmethod(lambda values: np.sum(values, axis=-1))
