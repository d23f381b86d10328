"""The MNIST benchmark's bookkeeping: merging runs seed by seed, the paired table."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_hybrid.py"
_SPEC = importlib.util.spec_from_file_location("mnist_hybrid", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _run(seed, error):
    return {"seed": seed, "test_error": error, "mac_ratio": 0.1}


def test_merge_adds_seeds_and_later_runs_win():
    into = {"budgets": {"0.1": {"hybrid": [_run(0, 0.01), _run(1, 0.02)]}}, "timing": {"a": 1}}
    bench._merge(
        into,
        {"budgets": {"0.1": {"hybrid": [_run(1, 0.03), _run(2, 0.04)]}}, "timing": {"b": 2}},
    )
    runs = into["budgets"]["0.1"]["hybrid"]
    assert [(r["seed"], r["test_error"]) for r in runs] == [(0, 0.01), (1, 0.03), (2, 0.04)]
    assert into["timing"] == {"a": 1, "b": 2}


def test_merge_keeps_budgets_largest_first():
    into = {"budgets": {"0.1": {"hybrid": [_run(0, 0.01)]}, "0.05": {"hybrid": [_run(0, 0.02)]}}}
    bench._merge(into, {"budgets": {"0.0667": {"hybrid": [_run(0, 0.03)]}}})
    assert list(into["budgets"]) == ["0.1", "0.0667", "0.05"]


def test_paired_compares_the_hybrid_with_each_rival_on_the_same_seeds():
    budgets = {
        "0.1": {
            "hybrid": [_run(0, 0.010), _run(1, 0.012)],
            "filters_only": [_run(0, 0.011), _run(1, 0.011), _run(2, 0.001)],  # seed 2 unpaired
            "scratch": [_run(0, 0.009), {"seed": 1, "unreachable": True}],
            "dhp": [_run(1, 0.013)],
        }
    }
    lines = bench.paired(budgets)
    header = (
        "| MAC budget | hybrid - filters_only | hybrid - ranks_only | hybrid - dhp | "
        "hybrid - scratch |"
    )
    assert lines[0] == header
    assert lines[2] == "| 0.1 | +0.00 (1/2) | - | -0.10 (1/1) | +0.10 (0/1) |"


def test_mac_ratios_are_each_methods_mean_after_strip():
    budgets = {"0.5": {"hybrid": [{"mac_ratio": 0.5}, {"mac_ratio": 0.4}], "dhp": [{"seed": 0}]}}
    lines = bench.mac_ratios(budgets)
    assert lines[0].startswith("| MAC budget | hybrid MACs | filters_only MACs |")
    cells = lines[2].split(" | ")
    assert cells[1] == "0.450" and cells[1 + bench.METHODS.index("dhp")] == "-"


_OPT_SPEC = importlib.util.spec_from_file_location(
    "optimizers_bench", _PATH.parent / "optimizers.py"
)
optimizers_bench = importlib.util.module_from_spec(_OPT_SPEC)
_OPT_SPEC.loader.exec_module(optimizers_bench)


def test_the_optimizer_table_has_a_row_per_run_and_each_optimizers_means():
    def run(name, seed, pretrained, final, uncompressed=None):
        result = {
            "optimizer": name,
            "seed": seed,
            "original_test_error": pretrained,
            "test_error_after_fit": final + 0.001,
            "test_error": final,
            "mac_ratio": 0.1,
            "param_ratio": 0.2,
        }
        if uncompressed is not None:
            result["uncompressed_test_error"] = uncompressed
        return result

    runs = [
        run("sgd", 0, 0.010, 0.008, uncompressed=0.007),
        run("sgd", 1, 0.014, 0.012, uncompressed=0.011),
        run("adam", 0, 0.01, 0.009),
    ]
    lines = optimizers_bench.table(runs)
    assert lines[2] == "| sgd | 0 | 1.00 | 0.70 | 0.90 | 0.80 | 0.100 | 0.200 |"
    assert lines[4] == "| adam | 0 | 1.00 | - | 1.00 | 0.90 | 0.100 | 0.200 |"
    # A control's mean only where every run of the optimizer has one (older records lack it).
    assert "| sgd | 2 | 1.20 | 0.90 | 1.00 |" in lines and "| adam | 1 | 1.00 | - | 0.90 |" in lines
    assert not any("at a fifth of the rate" in line for line in lines)  # no repeats recorded


def test_the_optimizer_table_spreads_the_last_epoch_over_its_repeats():
    runs = [
        {
            "optimizer": "sgd",
            "seed": seed,
            "original_test_error": 0.01,
            "test_error_after_fit": 0.012,
            "test_error": final,
            "mac_ratio": 0.1,
            "param_ratio": 0.2,
            "repeat_test_errors": repeats,
            "slower_repeat_test_errors": slower,
        }
        for seed, final, repeats, slower in [
            (0, 0.010, [0.012, 0.014], [0.009, 0.009]),
            (1, 0.008, [0.016, 0.010], [0.008, 0.010]),
        ]
    ]
    lines = optimizers_bench.table(runs)
    assert lines[-1] == "| sgd | 2 | 1.17 (0.80-1.60) | 0.90 (0.80-1.00) |"


_CMP_SPEC = importlib.util.spec_from_file_location(
    "compare_hybrid", _PATH.parent / "compare_hybrid.py"
)
compare_hybrid = importlib.util.module_from_spec(_CMP_SPEC)
_CMP_SPEC.loader.exec_module(compare_hybrid)


def test_compare_pairs_the_seeds_both_runs_have():
    before = {"0.1": {0: 0.010, 1: 0.012, 2: 0.020}}
    after = {"0.1": {0: 0.008, 1: 0.012, 5: 0.001}, "0.05": {0: 0.02}}
    lines = compare_hybrid.compare(before, after)
    assert lines[2] == "| 0.1 | 0: 1.00 -> 0.80, 1: 1.20 -> 1.20 | 1.100 | 1.000 |"
    assert len(lines) == 3  # 0.05 shares no seed


_UNIFY_SPEC = importlib.util.spec_from_file_location("unify_bench", _PATH.parent / "unify_mnist.py")
unify_bench = importlib.util.module_from_spec(_UNIFY_SPEC)
_UNIFY_SPEC.loader.exec_module(unify_bench)


def test_the_unify_table_has_a_row_per_budget_and_method_and_says_why_one_was_skipped():
    def run(method, seed, error, skipped=None):
        if skipped:
            return {"method": method, "bits": 0.03125, "seed": seed, "skipped": skipped}
        return {
            "method": method,
            "bits": 0.0625,
            "seed": seed,
            "test_error": error,
            "mac_ratio": 1.0,
            "counted_bits": 0.06,
            "measured_bits": 0.059,
        }

    runs = [
        run("both", 0, 0.008),
        run("both", 1, 0.010),
        run("cluster", 0, 0.012),
        run("unify", 0, None, skipped="a sign bit each"),
    ]
    runs.append({**run("both", 0, 0.03), "model": "residual_cnn", "multiply_ratio": 0.4})
    lines = unify_bench.table(runs)
    assert lines[2] == (
        "| lenet5 | 0.0625 | both | 2 | 0.90 | 0.80, 1.00 | 0.0600 | 0.0590 | 1.000 | - |"
    )
    assert lines[3].startswith("| lenet5 | 0.0625 | cluster | 1 | 1.20 |")
    assert lines[4] == "| lenet5 | 0.03125 | unify | - | - | a sign bit each | | | | |"
    assert lines[5].startswith("| residual_cnn | 0.0625 | both | 1 | 3.00 |")
    assert lines[5].endswith("| 1.000 | 0.400 |")  # its multiplies


def test_the_unify_method_takes_the_shortest_block_that_fits_the_budget():
    assert unify_bench.unify_block(1 / 8, 8) == (1, 4)  # 3 bits per weight of 4
    assert unify_bench.unify_block(1 / 16, 8) == (1, 16)  # 1.5 of 2 (1 x 8 would be 2)
    assert unify_bench.unify_block(1 / 16, 32) == (1, 64)
    with pytest.raises(ValueError, match="a sign bit each"):
        unify_bench.unify_block(1 / 32, 8)


def test_a_later_unify_record_replaces_the_same_run_of_an_earlier_one():
    first = {"runs": [{"method": "both", "bits": 0.5, "seed": 0, "test_error": 0.02}]}
    first["runs"].append({"method": "cluster", "bits": 0.5, "seed": 0, "test_error": 0.01})
    later = {"runs": [{"method": "both", "bits": 0.5, "seed": 0, "test_error": 0.015}]}
    runs = unify_bench.merged([first, later])
    assert sorted((r["method"], r["test_error"]) for r in runs) == [
        ("both", 0.015),
        ("cluster", 0.01),
    ]


_LRS_SPEC = importlib.util.spec_from_file_location(
    "lowrank_sparse_bench", _PATH.parent / "lowrank_sparse_mnist.py"
)
lowrank_sparse_bench = importlib.util.module_from_spec(_LRS_SPEC)
_LRS_SPEC.loader.exec_module(lowrank_sparse_bench)


def test_the_lowrank_sparse_table_has_a_row_per_budget_and_method_in_order():
    def run(method, params, seed, error):
        shares = {"mac_ratio": 1.05, "param_ratio": params, "bits_ratio": params + 0.03}
        return {"method": method, "params": params, "seed": seed, "test_error": error, **shares}

    runs = [
        {"method": "original", "params": 1.0, "seed": 0, "test_error": 0.02},
        run("sparse", 0.1, 0, 0.030),
        run("lowrank_sparse", 0.1, 0, 0.024),
        run("lowrank_sparse", 0.1, 1, 0.026),
        {**run("sparse", 0.5, 0, 0.021), "budget": "bits"},  # after every params row
    ]
    repeats = [runs[0], {**runs[2], "test_error": 0.5}]  # a second file's copies: left out
    runs = lowrank_sparse_bench.once_each(runs + repeats)
    lines = lowrank_sparse_bench.table(runs)
    assert lines[2] == "| - | original | 1 | 2.00 (2.00-2.00) | - | - | - |"
    assert lines[3] == (
        "| params 0.1 | lowrank_sparse | 2 | 2.50 (2.40-2.60) | 1.050 | 0.100 | 0.130 |"
    )
    assert lines[4].startswith("| params 0.1 | sparse | 1 | 3.00")
    assert lines[5].startswith("| bits 0.5 | sparse | 1 | 2.10")
    assert len(lines) == 6


def test_the_splits_table_counts_what_l_holds_and_what_s_keeps():
    from tfhybrid import keras

    from models import lenet_300_100

    inputs = keras.Input((28, 28, 1))
    conv = keras.layers.Conv2D(2, 3, name="conv")(inputs)  # a Conv2D's `rank` is 2: no rank
    with_conv = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(conv)))
    assert lowrank_sparse_bench.splits(with_conv, "params", [0.5], ["sparse"])[2].endswith("| - |")
    model = lenet_300_100()  # 784 x 300, 300 x 100 and 100 x 10 kernels, 410 biases
    methods = ["lowrank_sparse_fifth", "sparse", "df"]
    lines = lowrank_sparse_bench.splits(model, "params", [0.1], methods)
    assert len(lines) == 4  # DF is neither
    fifth, sparse = (line.strip("| ").split(" | ") for line in lines[2:])
    # L at a fifth of 10%: ranks 4, 1 and 1 (2% of each break-even rank, at least 1)
    low = 4 * (784 + 300) + 1 * (300 + 100) + 1 * (100 + 10)
    total, entries = model.count_params(), model.count_params() - 410
    assert fifth[:3] == ["params 0.1", "lowrank_sparse_fifth", f"{low / total:.3f}"]
    assert sparse[:3] == ["params 0.1", "sparse", "0.000"]
    assert fifth[4] == "fc1 4, fc2 1, fc3 1" and sparse[4] == "-"
    for row, kept in ((sparse, 0.1 * total - 410), (fifth, 0.1 * total - 410 - low)):
        least, most = map(float, row[3].split("-"))
        assert least == most == pytest.approx(kept / entries, abs=1e-4)


_EXPORT_SPEC = importlib.util.spec_from_file_location(
    "lowrank_sparse_export", _PATH.parent / "lowrank_sparse_export.py"
)
lowrank_sparse_export = importlib.util.module_from_spec(_EXPORT_SPEC)
_EXPORT_SPEC.loader.exec_module(lowrank_sparse_export)


def test_the_export_table_has_a_row_per_variant_and_a_cell_pair_per_file():
    def files(scale):
        variants = ("float", "float_sparse", "int8", "int8_sparse")
        return {
            v: {"bytes": 1000 * scale, "gzip_bytes": 900 * scale, "median_ms": 0.5 * scale}
            for v in variants
        }

    results = {
        "command": "python benchmarks/lowrank_sparse_export.py",
        "dense": files(4),
        "lowrank_sparse": {**files(1), "macs": 1.2, "params": 0.25},
    }
    lines = lowrank_sparse_export.table(results)
    assert lines[0].startswith("| variant | MACs | params | float bytes (gzip) | float ms |")
    assert lines[1] == "|---" * 11 + "|"
    assert lines[2].startswith("| dense | 1.000 | 1.000 | 4,000 (3,600) | 2.000 |")
    assert lines[3].endswith("| 1,000 (900) | 0.500 |") and "| 1.200 | 0.250 |" in lines[3]
    assert len(lines) == 4


_LC_SPEC = importlib.util.spec_from_file_location("lc_mnist", _PATH.parent / "lc_mnist.py")
lc_mnist = importlib.util.module_from_spec(_LC_SPEC)
_LC_SPEC.loader.exec_module(lc_mnist)


def test_the_lc_table_has_a_row_per_method_with_counted_and_measured_bits():
    runs = [
        {"method": "original", "seed": 0, "test_error": 0.02},
        {"method": "quantize_k2", "seed": 0, "test_error": 0.025},
        {"method": "quantize_k2", "seed": 1, "test_error": 0.027},
    ]
    for run in runs[1:]:
        run.update(counted_bits_ratio=0.0328, measured_bits_ratio=0.0330)
    lines = lc_mnist.table(runs)
    assert lines[2] == "| original | 1 | 2.00 (2.00-2.00) | - | - |"
    assert lines[3] == "| quantize_k2 | 2 | 2.60 (2.50-2.70) | 0.0328 | 0.0330 |"


def test_the_lc_files_table_has_a_row_per_exported_model():
    variants = ("float", "float_sparse", "int8", "int8_sparse")
    files = {v: {"bytes": 2000, "gzip_bytes": 300, "median_ms": 0.25} for v in variants}
    runs = [
        {"method": "original", "seed": 0, "test_error": 0.02},
        {"method": "quantize_k2", "seed": 0, "test_error": 0.025},
        {"method": "quantize_k2", "seed": 1, "test_error": 0.027},
    ]
    runs[1]["files"] = {**files, "bits": 8736, "compact_bytes": 9100}
    lines = lc_mnist.files_table_of(runs)
    assert lines[0].startswith("| model | test error % | bits measured | compact bytes |")
    assert lines[2].startswith("| quantize_k2 | 2.50 | 8,736 | 9,100 | 2,000 (300) | 0.250 |")
    assert len(lines) == 3 and lc_mnist.files_table_of(runs[2:]) == []


def test_merged_lowrank_sparse_runs_count_a_seed_once():
    original = {"method": "original", "params": 1.0, "seed": 0, "test_error": 0.02}
    runs = [original, {**original, "test_error": 0.03}, {**original, "seed": 1}]
    assert lowrank_sparse_bench.once_each(runs) == [original, {**original, "seed": 1}]
