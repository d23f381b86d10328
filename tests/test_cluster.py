"""techniques.cluster: TF-MOT weight clustering as a technique, counted in bits."""

import numpy as np
import pytest
from tensorflow_model_optimization.python.core.clustering.keras import cluster_wrapper

import tfhybrid as th
from tfhybrid.techniques import cluster

from models import fit_search, lenet5

keras = th.keras


def test_clustered_kernels_keep_their_values_and_count_as_indices_and_a_table():
    model = lenet5()
    compressed = th.hybrid_compress(model, th.Budget(bits=0.2), [th.Cluster(clusters=16)])
    wrappers = [la for la in compressed.layers if isinstance(la, cluster.ClusterWrapper)]
    assert all(isinstance(w, cluster_wrapper.ClusterWeights) for w in wrappers)
    assert [w.layer.name for w in wrappers] == ["conv1", "conv2", "fc1", "fc2"]
    x = fit_search(compressed, epochs=2)
    small = th.strip(compressed)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert np.unique(small.get_layer(name).kernel.numpy()).size <= 16
    np.testing.assert_allclose(small(x[:8]), compressed(x[:8]), rtol=1e-5, atol=1e-6)
    promised = float(compressed.ratios(hard=True)["bits"])
    measured = th.profile(small).ratios(th.profile(model))
    assert measured["bits"] <= promised <= 0.2 and measured["macs"] == 1.0
    # 4-bit indices and 16 float32 values per kernel; the biases stay float32.
    kernels = sum(model.get_layer(n).kernel.shape.num_elements() for n in ("conv1", "fc1"))
    assert promised > 4 * kernels / (32 * model.count_params())


def test_df_filters_and_cluster_stack_under_macs_and_bits():
    model = lenet5()
    compressed = th.hybrid_compress(
        model,
        th.Budget(macs=0.3, bits=0.1),
        [th.DF(ranks=False), th.Cluster(clusters=8)],
        search_steps=4,
    )
    x = fit_search(compressed, epochs=2)
    small = th.strip(compressed)
    scale = np.abs(compressed(x[:8]).numpy()).max()
    np.testing.assert_allclose(small(x[:8]), compressed(x[:8]), atol=1e-5 * scale)
    ratios = th.profile(small).ratios(th.profile(model))
    assert ratios["macs"] <= 0.3 and ratios["bits"] <= 0.1


@pytest.mark.parametrize(
    "options,message",
    [
        ({"clusters": 1}, "at least 2"),
        ({"clusters": 2, "preserve_sparsity": True}, "at least 3"),
        ({"init": "median"}, "init='median'"),
    ],
)
def test_bad_cluster_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        th.Cluster(**options)
