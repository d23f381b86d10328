"""Human-readable reports: the per-layer summary table."""

from __future__ import annotations

import warnings
from typing import Any

from tfhybrid import cost, graph, surgery
from tfhybrid.training.model import CompressionModel

#: The names `factorize` gives the two layers a split layer becomes.
SPLIT_SUFFIXES = ("_u", "_v")
#: The names of a layer's parallel parts (`LowRankSparse`); the `Add` keeps its name.
PARALLEL_SUFFIXES = ("_lowrank_in", "_lowrank_core", "_lowrank_out", "_sparse")


def summary(model: Any, print_fn: Any = print, original: Any = None) -> str:
    """Prints and returns a per-layer table of output shape, MACs and parameters.

    Three forms:
    - a plain model: each layer's output shape, MACs and parameters; layers that
      carry a fixed decision (a channel mask) say it in the last column;
    - a plain model with its `original` (e.g. `summary(strip(cmodel), original=model)`):
      each of the original's layers, original → now, and what was done to it (channels
      kept, split at a rank, removed);
    - a compression model (from `hybrid_compress`): each of its layers once, with the
      MACs and parameters it will have and what `strip` will do with it, from the
      current decisions projected onto the budget.

    Args:
        model: a functional or built Sequential tf_keras model, or a compression model.
        print_fn: where the table goes (`print` by default; None prints nothing).
        original: the model `model` was made from, to compare layer by layer.

    Returns:
        The table as one string.
    """
    if isinstance(model, CompressionModel):
        table = _search_table(model)
    elif original is not None:
        table = _comparison_table(model, original)
    else:
        table = _plain_table(model)
    if print_fn is not None:
        print_fn(table)
    return table


def _plain_table(model: Any) -> str:
    prof = cost.profile(model)
    layers = {layer.name: layer for layer in graph.flatten(model).layers}
    rows = []
    for item in prof.layers:
        note = getattr(layers.get(item.name), "compression_note", None)
        kept = note() if callable(note) else ""
        rows.append((item.name, item.type, str(item.output_shape), item.macs, item.params, kept))
    return _format(("kept",), rows, (prof.macs, prof.params))


def _comparison_table(model: Any, original: Any) -> str:
    old, new = cost.profile(original), cost.profile(model)
    now = _by_layer(new)
    rows = []
    for name, item in _by_layer(old).items():
        parts = _parts(name, now)
        shape = parts[-1].output_shape if parts else None
        rows.append(
            (
                name,
                item.type,
                str(item.output_shape) + ("" if shape == item.output_shape else f" → {shape}"),
                f"{item.macs:,} → {sum(p.macs for p in parts):,}",
                f"{item.params:,} → {sum(p.params for p in parts):,}",
                _what_was_done(item, parts, costed=True),
            )
        )
    total = (f"{old.macs:,} → {new.macs:,}", f"{old.params:,} → {new.params:,}")
    return _format(("done",), rows, total)


def changes(model: Any, original: Any) -> dict[str, str]:
    """What was done to each layer of `original` that has weights ("20 → 3 channels",
    "split at rank 12", "removed", "unchanged", ...), by layer name."""
    now = _by_layer(cost.profile(model))
    return {
        name: _what_was_done(item, _parts(name, now), costed=True)
        for name, item in _by_layer(cost.profile(original)).items()
        if item.params
    }


def _search_table(model: CompressionModel) -> str:
    stripped = cost.profile(surgery.strip(model, model.plan()))
    now = _by_layer(stripped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it counts training-time layers as 0 MACs
        searching = _by_layer(cost.profile(model))
    layers = {layer.name: layer for layer in model.layers}
    rows = []
    for name, item in searching.items():
        wrapped = getattr(layers.get(name), "layer", None)  # a TF-MOT wrapper's own layer
        parts = _parts(name if wrapped is None else wrapped.name, now)
        rows.append(
            (
                name,
                item.type,
                str(item.output_shape),
                sum(p.macs for p in parts),
                sum(p.params for p in parts),
                _what_was_done(item, parts, costed=False),
            )
        )
    return _format(("strip will (now)",), rows, (stripped.macs, stripped.params))


def _by_layer(prof: cost.Profile) -> dict[str, cost.LayerCost]:
    """Each layer once (its first call), with the MACs of all its calls."""
    layers: dict[str, cost.LayerCost] = {}
    for item in prof.layers:
        if item.name in layers:
            first = layers[item.name]
            layers[item.name] = cost.LayerCost(
                first.name, first.type, first.output_shape, first.macs + item.macs, first.params
            )
        else:
            layers[item.name] = item
    return layers


def _parts(name: str, now: dict[str, cost.LayerCost]) -> list[cost.LayerCost]:
    """What layer `name` became: itself, its split pair, its parallel parts (then the
    `Add` of its name last), or nothing (removed)."""
    if name + PARALLEL_SUFFIXES[0] in now:
        return [now[name + s] for s in PARALLEL_SUFFIXES if name + s in now] + [now[name]]
    if name in now:
        return [now[name]]
    return [now[name + s] for s in SPLIT_SUFFIXES if name + s in now]


def _what_was_done(item: cost.LayerCost, parts: list[cost.LayerCost], costed: bool) -> str:
    """What was done to a layer: "removed", "split at rank r", "20 → 3 channels", or for one
    with weights left as it was: "unchanged" / "fewer inputs" (when `item`'s costs are
    known), else "whole"."""
    if not parts:
        return "removed"
    done = []
    if len(parts) == 2:
        done.append(f"split at rank {parts[0].output_shape[-1]}")
    if len(parts) == len(PARALLEL_SUFFIXES):  # a pair beside S
        done.append(f"rank {parts[0].output_shape[-1]} + sparse")
    if len(parts) == len(PARALLEL_SUFFIXES) + 1:  # a Tucker-2 chain beside S
        ranks = parts[0].output_shape[-1], parts[1].output_shape[-1]
        done.append(f"Tucker-2 ranks {ranks[0]}, {ranks[1]} + sparse")
    channels, kept = item.output_shape[-1:], parts[-1].output_shape[-1:]
    if channels != kept:
        done.append(f"{channels[0]} → {kept[0]} channels")
    if done or not item.params:
        return ", ".join(done)
    if not costed:
        return "whole"
    same = (item.macs, item.params) == (parts[0].macs, parts[0].params)
    return "unchanged" if same else "fewer inputs"


def _format(last: tuple, rows: list, totals: tuple) -> str:
    """The aligned table: a header, `rows`, and a totals row."""
    header = ("layer", "type", "output shape", "MACs", "params", *last)
    cells = [header]
    for row in rows:
        cells.append(tuple(f"{c:,}" if isinstance(c, int) else str(c) for c in row))
    cells.append(("total", "", "", *(f"{t:,}" if isinstance(t, int) else t for t in totals), ""))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
