"""summary: the per-layer table."""

import numpy as np

import tfhybrid as th

from models import lenet5


def test_summary_lists_layers_totals_and_kept_channels():
    model = lenet5()
    group = next(g for g in th.channel_groups(model) if g.layers("produces") == ["conv1"])
    masked = th.prune_channels(model, {group.id: np.arange(5)}, masked=True)
    printed = []
    table = th.summary(masked, print_fn=printed.append)
    assert printed == [table]
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "MACs", "params", "kept"]
    row = next(line for line in lines if line.startswith("conv1_channel_mask"))
    assert row.rstrip().endswith("kept 15/20 channels")
    assert lines[-1].split() == ["total", "2,293,000", "431,080"]
    assert "(24, 24, 20)" in next(line for line in lines if line.startswith("conv1 "))
