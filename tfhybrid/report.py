"""Human-readable reports: the per-layer summary table."""

from __future__ import annotations

from typing import Any

from tfhybrid import cost, graph


def summary(model: Any, print_fn: Any = print) -> str:
    """Prints and returns a per-layer table of output shape, MACs and parameters.

    Layers that carry a compression decision (a channel mask, a learned rank...)
    say what they kept in the last column, through their `compression_note()`.

    Args:
        model: a functional or built Sequential tf_keras model.
        print_fn: where the table goes (`print` by default; None prints nothing).

    Returns:
        The table as one string.
    """
    prof = cost.profile(model)
    layers = {layer.name: layer for layer in graph.flatten(model).layers}
    header = ("layer", "type", "output shape", "MACs", "params", "kept")
    rows = [header]
    for item in prof.layers:
        note = getattr(layers.get(item.name), "compression_note", None)
        rows.append(
            (
                item.name,
                item.type,
                str(item.output_shape),
                f"{item.macs:,}",
                f"{item.params:,}",
                note() if callable(note) else "",
            )
        )
    rows.append(("total", "", "", f"{prof.macs:,}", f"{prof.params:,}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    table = "\n".join(lines)
    if print_fn is not None:
        print_fn(table)
    return table
