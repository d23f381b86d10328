"""export.compact: the counted block format as a file, restored weight for weight."""

import math

import numpy as np
import pytest

import tfhybrid as th

from models import fit_search, lenet5

keras = th.keras


def blocked_dense() -> keras.Model:
    """One Dense 3 -> 8 whose 1 x 4 blocks are: 2 unified, 2 pruned, 2 free."""
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(8, name="dense")
    model = keras.Model(inputs, dense(inputs))
    kernel = np.array(
        [
            [0.5, -0.5, 0.5, 0.5, 0, 0, 0, 0],
            [-0.25, -0.25, 0.25, -0.25, 1, 2, 3, 4],
            [0, 0, 0, 0, -1, 0.5, 0.25, 0.125],
        ],
        np.float32,
    )
    dense.set_weights([kernel, np.arange(1, 9, dtype=np.float32)])
    return model


@pytest.mark.parametrize("magnitude", [0.25, 0.3], ids=["on_a_grid", "float32"])
def test_a_blocked_kernel_stores_codes_signs_magnitudes_and_free_weights(tmp_path, magnitude):
    model = blocked_dense()
    kernel, bias = model.get_weights()
    kernel[1, :4] *= magnitude / 0.25
    model.get_layer("dense").set_weights([kernel, bias])
    report = th.save_compact(model, str(tmp_path / "m.thc"), block=(1, 4))
    assert report.kernels == {"dense": {"free": 2, "unified": 2, "pruned": 2}}
    # 6 blocks x 2 code bits, 8 sign bits, 2 magnitudes and 8 free weights, 8 biases. The
    # magnitudes 0.5 and 0.25 are 2 and 1 steps of 0.25: a bit each and the step.
    magnitude_bits, floats = (2 * 1, 1 + 8) if magnitude == 0.25 else (0, 2 + 8)
    kernel_bits = 6 * 2 + 8 + magnitude_bits + 32 * floats
    assert report.counted_bits == kernel_bits + 32 * 8
    assert report.payload_bytes == math.ceil((6 * 2 + 8 + magnitude_bits) / 8) + 4 * (floats + 8)
    assert f"{report.size_bytes:,} bytes" in str(report) and "of float32" in str(report)
    loaded = th.load_compact(str(tmp_path / "m.thc"))
    for original, restored in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(restored, original)


def test_profile_counts_one_multiply_per_unified_block_and_none_per_pruned_one():
    profile = th.profile(blocked_dense(), block=(1, 4))
    assert profile.macs == 24 and profile.multiplies == 8 + 2  # 8 free weights, 2 unified
    assert th.profile(blocked_dense()).multiplies == 24  # no blocks: every MAC multiplies


def test_a_kernel_the_blocks_do_not_shrink_stays_float32(tmp_path):
    model = blocked_dense()
    kernel, bias = model.get_weights()
    model.get_layer("dense").set_weights([kernel + np.linspace(0, 1e-3, 24).reshape(3, 8), bias])
    report = th.save_compact(model, str(tmp_path / "m.thc"))
    assert report.kernels == {} and report.counted_bits == report.float32_bits


def test_a_unified_lenet_round_trips_at_the_size_the_budget_counted(tmp_path):
    model = lenet5()
    compressed = th.hybrid_compress(
        model, th.Budget(bits=0.5), [th.Unify(block=(1, 4), unify=0.6, prune=0.3)]
    )
    x = fit_search(compressed, epochs=2)
    small = th.strip(compressed)
    report = th.save_compact(small, str(tmp_path / "lenet.thc"), block=(1, 4))
    counted = float(compressed.ratios(hard=True)["bits"]) * 32 * model.count_params()
    assert report.counted_bits == pytest.approx(counted, rel=1e-3)
    assert report.counted_bits == th.profile(small, block=(1, 4)).bits
    tensors = len(small.get_weights())
    assert 0 <= 8 * report.payload_bytes - report.counted_bits < 8 * tensors
    loaded = th.load_compact(str(tmp_path / "lenet.thc"))
    for original, restored in zip(small.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(restored, original)
    np.testing.assert_array_equal(loaded(x[:4]), small(x[:4]))
    fc1 = report.kernels["fc1"]
    assert fc1["pruned"] == round(0.3 * 100_000) and fc1["unified"] == round(0.6 * 100_000)


def test_each_tensor_is_stored_in_the_cheapest_exact_encoding_profile_counts(tmp_path):
    inputs = keras.Input((64,))
    table = keras.layers.Dense(32, name="table")
    sparse = keras.layers.Dense(16, name="sparse")
    dense = keras.layers.Dense(4, name="dense")
    model = keras.Model(inputs, dense(sparse(table(inputs))))
    rng = np.random.default_rng(0)
    codebook = np.array([-0.7, -0.1, 0.2, 0.9, 1.3], np.float32)  # 5 values: 3-bit indices
    table_kernel = codebook[rng.integers(0, 5, (64, 32))]
    sparse_kernel = rng.normal(size=(32, 16)).astype(np.float32)
    sparse_kernel[rng.random((32, 16)) < 0.9] = 0
    table.set_weights([table_kernel, np.zeros(32, np.float32)])
    sparse.set_weights([sparse_kernel, rng.normal(size=16).astype(np.float32)])
    report = th.save_compact(model, str(tmp_path / "m.thc"), block=None)
    assert report.encodings == {
        "table/0": "table",
        "table/1": "sparse",  # all zero: the bitmap alone
        "sparse/0": "sparse",
        "sparse/1": "float32",
        "dense/0": "float32",
        "dense/1": "sparse",
    }
    nonzero = int(np.count_nonzero(sparse_kernel))
    expected = (3 * 64 * 32 + 32 * 5) + 32 + (32 * nonzero + 32 * 16) + 32 * 16
    expected += 32 * 16 * 4 + 4  # dense kernel (Glorot: all distinct), zero bias
    assert report.counted_bits == expected == th.profile(model).bits
    assert 0 <= 8 * report.payload_bytes - report.counted_bits < 8 * 6
    loaded = th.load_compact(str(tmp_path / "m.thc"))
    for original, restored in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(restored, original)


def test_compact_refuses_search_models_and_other_files(tmp_path):
    compressed = th.hybrid_compress(lenet5(), th.Budget(bits=0.5), [th.Unify()])
    with pytest.raises(ValueError, match="save_compact needs the plain model"):
        th.save_compact(compressed, str(tmp_path / "m.thc"))
    (tmp_path / "other.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a tfhybrid compact weight file"):
        th.load_compact(str(tmp_path / "other.bin"))
