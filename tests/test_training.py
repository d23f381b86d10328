"""training.model: the hooks a technique gets during fit, the optimizers, the budget terms."""

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid.techniques import base

from models import lenet5

keras = th.keras


@pytest.fixture(scope="module")
def hooked():
    """A Sparse variant whose hooks leave traces: an L2 loss on the kernels it prunes, the
    biases set to the step before each step and raised by 100 after it, the threshold set
    to 7 + epoch after each epoch."""

    class Hooked(th.Sparse):
        name = "hooked_sparse_for_tests"

        def loss(self, model):
            return tf.add_n(
                [10.0 * tf.reduce_sum(w.layer.kernel**2) for w in self.layers_of(model)]
            )

        def before_step(self, model, step):
            for wrapper in self.layers_of(model):
                bias = wrapper.layer.bias
                bias.assign(tf.fill(bias.shape, tf.cast(step, tf.float32)))

        def after_step(self, model):
            for wrapper in self.layers_of(model):
                wrapper.layer.bias.assign_add(tf.fill(wrapper.layer.bias.shape, 100.0))

        def on_epoch_end(self, model, epoch):
            for wrapper in self.layers_of(model):
                wrapper.pruning_vars[0][2].assign(7.0 + epoch)  # TF-MOT's threshold

    return base.register_technique(Hooked)


def test_a_techniques_loss_and_step_hooks_run_in_the_training_step(hooked):
    compressed = th.hybrid_compress(
        lenet5(), th.Budget(params=0.9), [hooked(sparsity=0.5, layers=["fc2"])], search_steps=2
    )
    (fc2,) = [w.layer for w in compressed.technique_layers() if w.layer.name == "fc2"]
    start = fc2.kernel.numpy().copy()
    compressed.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = np.zeros((8, 28, 28, 1), np.float32)  # fc2's inputs are 0: no task gradient on it
    compressed.fit(x, np.zeros(8), batch_size=4, verbose=0, callbacks=[th.CompressionScheduler()])
    kept = fc2.kernel.numpy() != 0
    assert 0.4 < kept.mean() < 0.6  # TF-MOT's mask
    # Two SGD steps on 10 * |w|^2 at rate 0.01 scale the kept weights by 0.8 each.
    np.testing.assert_allclose(fc2.kernel.numpy()[kept], 0.64 * start[kept], rtol=1e-4)
    # The last step: bias set to 1, moved a little by SGD, then raised by 100.
    assert np.all(np.abs(fc2.bias.numpy() - 101.0) < 0.1)
    (wrapper,) = compressed.technique_layers()
    assert float(wrapper.pruning_vars[0][2].numpy()) == 7.0  # on_epoch_end of epoch 0


def test_the_budget_counts_every_techniques_decisions_as_the_cost_model_does():
    model = lenet5()
    techniques = [th.DF(ranks=False), th.Sparse(sparsity=0.5, layers=["fc1"])]
    compressed = th.hybrid_compress(model, th.Budget(macs=0.5, bits=0.5), techniques)
    decisions = compressed.decisions(hard=True)
    assert decisions.densities == {"fc1": 0.5} and set(decisions.counts) == {1, 2, 3}
    costs = compressed.cost_model.costs(densities={"fc1": 0.5})  # every channel still kept
    expected = {k: costs[k] / compressed.original_cost[k] for k in costs}
    assert {k: float(v) for k, v in compressed.ratios(hard=True).items()} == pytest.approx(expected)
    soft = compressed.ratios()
    assert all(tf.is_tensor(v) for v in soft.values())
