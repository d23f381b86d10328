"""CompressionScheduler under MirroredStrategy; CompressionLogger's TensorBoard scalars."""

import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid.techniques import df

from models import lenet5

keras = th.keras

_MIRRORED = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tfhybrid as th
    from tfhybrid.techniques import df
    from models import lenet5
    keras = th.keras
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    x = np.random.default_rng(0).normal(size=(64, 28, 28, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 64)
    with strategy.scope():
        model = th.hybrid_compress(lenet5(), th.Budget(macs=0.2), search_steps=6)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[th.CompressionScheduler()])
    assert model.search_finished()
    searched = [df.gates_of(model), *df.factored_layers_of(model)]
    for layer in searched:
        for var in layer.weights:
            replicas = [v.numpy() for v in var.values]
            assert len(replicas) == 2 and all(np.array_equal(replicas[0], r) for r in replicas)
    small = th.strip(model)
    assert th.profile(small).macs <= 0.2 * th.profile(lenet5()).macs
    print("MIRRORED OK", int(model.compression_step.numpy()))
    techniques = [th.DF(ranks=False), th.Sparse(sparsity=0.5, layers=["conv2"]),
                  th.LowRankSparse(rank=16, sparsity=0.8, layers=["fc1"]),
                  th.Cluster(clusters=8, layers=["fc2"]), th.LC({"conv1": th.Quantize(4)})]
    with strategy.scope():
        stacked = th.hybrid_compress(
            lenet5(), th.Budget(macs=0.3, params=0.3), techniques, search_steps=4)
        stacked.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stacked.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[th.CompressionScheduler()])
    for layer in stacked.technique_layers():
        for var in layer.weights:
            replicas = [v.numpy() for v in getattr(var, "values", [var])]
            assert all(np.array_equal(replicas[0], r) for r in replicas), var.name
    small = th.strip(stacked)
    ratios = th.profile(small).ratios(th.profile(lenet5()))
    assert ratios["macs"] <= 0.3 and ratios["params"] <= 0.3
    assert len(np.unique(small.get_layer("conv1").kernel.numpy())) <= 4  # LC's codebook
    print("STACKED OK", int(stacked.compression_step.numpy()))
    with strategy.scope():
        generated = th.hybrid_compress(
            lenet5(), th.Budget(macs=0.5), [th.DHP(gamma=20.0)], search_steps=6)
        generated.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    generated.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[th.CompressionScheduler()])
    assert generated.search_finished()
    for layer in generated.technique_layers():
        for var in layer.weights:
            replicas = [v.numpy() for v in getattr(var, "values", [var])]
            assert all(np.array_equal(replicas[0], r) for r in replicas), var.name
    small = th.strip(generated)
    assert th.profile(small).macs <= 0.5 * th.profile(lenet5()).macs
    print("DHP OK", int(generated.compression_step.numpy()))
    """
)


def test_searches_under_mirrored_strategy_take_identical_decisions_on_both_replicas():
    tests = pathlib.Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED], cwd=tests, capture_output=True, text=True, timeout=600
    )
    assert "MIRRORED OK 12" in result.stdout, result.stderr[-3000:]
    assert "STACKED OK 8" in result.stdout, result.stderr[-3000:]
    assert "DHP OK 12" in result.stdout, result.stderr[-3000:]


def _scalar_events(log_dir: pathlib.Path) -> list:
    """(tag, step, value) of every scalar the TensorBoard event files under `log_dir` hold."""
    return [
        (value.tag, event.step, float(tf.make_ndarray(value.tensor)))
        for event_file in log_dir.glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(event_file))
        for value in event.summary.value
    ]


def _scalars(log_dir: pathlib.Path) -> dict:
    """tag -> {step: value} of the scalars TensorBoard event files under `log_dir` hold."""
    scalars = {}
    for tag, step, number in _scalar_events(log_dir):
        scalars.setdefault(tag, {})[step] = number
    return scalars


def test_logger_writes_ratios_kept_channels_and_ranks(tmp_path):
    model = lenet5()
    x = np.random.default_rng(0).normal(size=(32, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 32)
    compressed = th.hybrid_compress(model, th.Budget(macs=0.3), search_steps=4)
    for layer in th.DF().decision_layers(compressed):
        layer.set_pace(1.0)  # the usual pace: two steps keep every channel
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logger = th.CompressionLogger(str(tmp_path), update_freq=np.int64(2))
    callbacks = [th.CompressionScheduler(), logger]
    compressed.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    scalars = _scalars(tmp_path)
    assert {"compression/macs_ratio", "compression/temperature", "rank/fc1"} <= scalars.keys()
    assert {"kept_channels/conv1", "kept_channels/fc1"} <= scalars.keys()
    # Every 2 batches (4 per epoch), not only at the epochs' ends.
    assert set(scalars["compression/macs_ratio"]) == {2, 4, 6, 8}
    # An epoch's end (steps 4 and 8) right after a batch's write adds no second point.
    written = [step for tag, step, _ in _scalar_events(tmp_path) if tag == "rank/fc1"]
    assert sorted(written) == [2, 4, 6, 8]
    # Once the search is over, its own decisions are the frozen, projected ones.
    for name in ("kept_channels/conv1", "kept_channels/fc1", "rank/fc1", "rank/conv2"):
        assert scalars[f"search/{name}"][8] == scalars[name][8]
    # Two steps in, the search keeps every channel; what strip would keep meets the budget.
    assert scalars["compression/macs_ratio"][2] > 0.3
    assert scalars["search/kept_channels/conv1"][2] == 20 > scalars["kept_channels/conv1"][2]


@pytest.mark.parametrize("update_freq", [0, "batch", True, 2.5])
def test_logger_refuses_an_unknown_update_freq(update_freq):
    with pytest.raises(ValueError, match="update_freq"):
        th.CompressionLogger("/tmp/unused", update_freq=update_freq)


def test_a_fit_that_ends_with_the_search_leaves_the_decided_model():
    x = np.random.default_rng(0).normal(size=(32, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 32)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=4)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compressed.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    # The search's last batch has trained: predict (and so evaluate) sees the decisions.
    small = th.strip(compressed)
    assert th.profile(small).macs <= 0.3 * th.profile(lenet5()).macs
    expected = small.predict(x, verbose=0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(compressed.predict(x, verbose=0), expected, atol=1e-4 * scale)
    # The search is over: fine-tuning needs no scheduler, in fit or train_on_batch.
    assert compressed.search_finished()
    compressed.fit(x, y, batch_size=8, epochs=1, verbose=0)
    compressed.train_on_batch(x[:8], y[:8])
    assert int(compressed.compression_step.numpy()) == 9
    np.testing.assert_array_equal(th.profile(th.strip(compressed)).macs, th.profile(small).macs)


class _SaveEveryBatch(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_batch_end(self, batch, logs=None):
        self.model.save(self.path)


def test_a_model_saved_before_the_decisions_were_taken_is_still_searching(tmp_path):
    """A checkpoint written at the search's last batch, before the scheduler took the
    decisions (callbacks listed before it), loads as a search model (soft masks, its
    decisions to take), not as a model whose decisions keep every channel."""
    x = np.random.default_rng(0).normal(size=(32, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 32)
    compressed = th.hybrid_compress(lenet5(), th.Budget(macs=0.3), search_steps=4)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(tmp_path / "last.keras")
    callbacks = [_SaveEveryBatch(path), th.CompressionScheduler()]
    compressed.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
    with th.custom_object_scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.compression_step.numpy()) == 4 and not loaded.search_finished()
    logits = df.gates_of(loaded).logits[0]
    searched = logits.numpy()
    logits.assign(-np.abs(searched) - 1e-3)  # its masks follow its logits, not `keep` (ones)
    assert float(tf.reduce_max(df.gates_of(loaded).masks()[0])) < 0.5
    logits.assign(searched)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[th.CompressionScheduler()])
    assert loaded.search_finished()
    assert th.profile(th.strip(loaded)).macs <= 0.3 * th.profile(lenet5()).macs
