"""summary: the per-layer table."""

import numpy as np
import pytest

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


def test_summary_of_a_stripped_model_against_its_original():
    model = lenet5()
    group = next(g for g in th.channel_groups(model) if g.layers("produces") == ["conv2"])
    small = th.factorize(th.prune_channels(model, {group.id: np.arange(30)}), {"fc1": 8})
    table = th.summary(small, print_fn=None, original=model)
    rows = {line.split()[0]: line for line in table.splitlines()[2:-2]}
    assert rows.keys() == {"conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"}
    assert rows["conv1"].endswith("unchanged")
    assert rows["conv2"].endswith("50 → 20 channels") and "25,050 → 10,020" in rows["conv2"]
    assert rows["fc1"].endswith("split at rank 8")
    fc1 = th.profile(small).layers
    fc1_macs = sum(item.macs for item in fc1 if item.name in ("fc1_u", "fc1_v"))
    assert f"400,000 → {fc1_macs:,}" in rows["fc1"]
    total = table.splitlines()[-1]
    assert f"2,293,000 → {th.profile(small).macs:,}" in total


def test_summary_of_a_search_model_shows_each_layer_once_and_what_strip_will_do():
    model = lenet5()
    cmodel = th.hybrid_compress(model, th.Budget(macs=0.1), search_steps=10)
    table = th.summary(cmodel, print_fn=None)
    names = [line.split()[0] for line in table.splitlines()[2:-2]]
    assert names == ["conv1", "pool1", "channel_gates", "conv2", "pool2", "flatten", "fc1", "fc2"]
    assert table.splitlines()[0].endswith("strip will (now)")
    rows = dict(zip(names, table.splitlines()[2:-2]))
    assert rows["channel_gates"].endswith("removed")
    with pytest.warns(UserWarning, match="still searching"):
        small = th.strip(cmodel)
    assert table.splitlines()[-1].split()[1] == f"{th.profile(small).macs:,}"
    changes = th.report.changes(small, model)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        expected = {"unchanged": "whole", "fewer inputs": "whole"}.get(changes[name], changes[name])
        assert rows[name].endswith(expected), rows[name]


def test_summary_names_what_a_wrapped_layer_and_its_parallel_parts_become():
    model = lenet5()
    compressed = th.hybrid_compress(
        model,
        th.Budget(params=0.5),
        [th.LowRankSparse(rank=16, sparsity=0.9, layers=["fc1"]), th.Sparse(0.5, layers=["conv2"])],
        search_steps=4,
    )
    search = th.summary(compressed, print_fn=None).splitlines()
    row = next(line for line in search if line.startswith("low_rank_sparse_wrapper_fc1"))
    assert "420,800" in row and row.endswith("rank 16 + sparse")
    pruned = next(line for line in search if line.startswith("sparse_wrapper_conv2"))
    assert pruned.endswith("whole")  # it was "removed": a wrapper's layer keeps its name
    compressed.finish_search()
    rows = th.summary(th.strip(compressed), original=model, print_fn=None).splitlines()
    fc1 = next(line for line in rows if line.startswith("fc1 "))
    assert "400,000 → 420,800" in fc1 and fc1.endswith("rank 16 + sparse")
