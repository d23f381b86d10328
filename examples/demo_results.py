"""The demo's results as the README shows them (no flags: tests import it)."""

import re

#: The README's block that `examples/lenet_mnist.py --write_readme` rewrites.
README_BLOCK = re.compile(r"(<!-- demo results: begin -->\n).*?(<!-- demo results: end -->)", re.S)


def results_table(result: dict) -> str:
    """The comparison as the README shows it: a Markdown table and the learned structure."""
    (macs, small_macs), (params, small_params) = result["macs"], result["params"]
    error, small_error = result["test_error"]
    structure = ", ".join(f"`{name}` {done}" for name, done in result["layers"].items())
    return "\n".join(
        [
            "| | original | compressed | ratio |",
            "|---|---|---|---|",
            f"| MACs | {macs:,} | {small_macs:,} | {small_macs / macs:.3f} "
            f"({macs / small_macs:.1f}× fewer) |",
            f"| params | {params:,} | {small_params:,} | {small_params / params:.3f} |",
            f"| test error | {error:.2%} | {small_error:.2%} | |",
            "",
            f"The learned structure: {structure}.",
        ]
    )
