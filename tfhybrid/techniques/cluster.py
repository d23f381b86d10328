"""Cluster: TF-MOT's weight clustering (`cluster_weights`) as a technique.

Each Dense/Conv kernel TF-MOT can cluster is wrapped in TF-MOT's clustering wrapper:
from the first step on, the layer computes with every weight replaced by the nearest
of `clusters` shared values (the centroids, trained with the weights). A kernel of n
weights then stores n indices of ceil(log2(clusters)) bits and the centroids: the
budget counts that as its bits. MACs and the parameter count do not change. `strip`
gives the plain layer with the clustered kernel (what TF-MOT's `strip_clustering`
returns); export it with `quantize="int8"` or gzip it to realise the saving.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.clustering.keras import cluster_wrapper

from tfhybrid import graph, plan
from tfhybrid._keras import keras
from tfhybrid.techniques import base
from tfhybrid.techniques.sparse import NOT_PRUNED, PRUNED

_INITS = {
    "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    "linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
    "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    "random": tfmot.clustering.keras.CentroidInitialization.RANDOM,
}


@keras.utils.register_keras_serializable(package="tfhybrid")
class ClusterWrapper(cluster_wrapper.ClusterWeights):
    """TF-MOT's clustering wrapper with the search's `step` and `decided` counters."""

    def build(self, input_shape):
        super().build(input_shape)
        base.add_search_state(self)


@base.register_technique
class Cluster(base.Technique):
    """Weight sharing: each kernel keeps `clusters` distinct values (TF-MOT clustering).

    Args:
        clusters: distinct values per kernel (>= 2; 3 or more with `preserve_sparsity`).
        init: centroid initialisation: "kmeans++", "linear", "density" or "random".
        preserve_sparsity: keep zero weights at zero (e.g. after `Sparse`).
        layers: only these layers (besides `hybrid_compress`'s own `layers`/`skip`).
        skip: never these layers.

    Raises:
        ValueError: for too few clusters or an unknown `init`.
    """

    name = "cluster"

    def __init__(
        self,
        clusters: int = 16,
        init: str = "kmeans++",
        preserve_sparsity: bool = False,
        layers: list | None = None,
        skip: list | tuple = (),
    ):
        least = 3 if preserve_sparsity else 2
        if int(clusters) < least:
            raise ValueError(
                f"Cluster(clusters={clusters}): give at least {least} clusters"
                + (" with preserve_sparsity (one is the zero)." if preserve_sparsity else ".")
            )
        if init not in _INITS:
            raise ValueError(f"Cluster(init={init!r}): give one of {sorted(_INITS)}.")
        self.clusters, self.init = int(clusters), init
        self.preserve_sparsity = bool(preserve_sparsity)
        self.layers, self.skip = list(layers or []), list(skip)

    def get_config(self) -> dict:
        return {
            "clusters": self.clusters,
            "init": self.init,
            "preserve_sparsity": self.preserve_sparsity,
            "layers": self.layers,
            "skip": self.skip,
        }

    def select(self, setup: base.Setup) -> dict[str, str]:
        only, skip = setup.restricted("Cluster", self.layers, self.skip)
        taken = [
            layer.name
            for layer in setup.analysis.model.layers
            if isinstance(layer, PRUNED)
            and not isinstance(layer, NOT_PRUNED)
            and layer.name not in skip
            and (not only or layer.name in only)
        ]
        if not taken:
            raise ValueError(
                "Cluster finds no Dense or Conv layer to cluster within `layers=`/`skip=`."
            )
        self._taken = taken
        return dict.fromkeys(taken, "weights")

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if op.layer.name not in self._taken:
            return None
        inner = graph.clone_layer(op.layer)
        inner.build(op.inputs[0].shape)
        inner.set_weights(op.layer.get_weights())  # the centroids start from these
        return ClusterWrapper(
            inner,
            number_of_clusters=self.clusters,
            cluster_centroids_init=_INITS[self.init],
            preserve_sparsity=self.preserve_sparsity,
        )

    def layers_of(self, model: Any) -> list:
        return [layer for layer in model.layers if isinstance(layer, ClusterWrapper)]

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        index_bits = math.ceil(math.log2(self.clusters))
        bits = {w.layer.name: (index_bits, self.clusters) for w in self.layers_of(model)}
        return base.Decisions(bits=bits)

    def plan(self, model: Any) -> plan.Plan:
        """Each wrapper becomes its layer with the clustered kernel."""
        replace = {w.name: _clustered_layer(w) for w in self.layers_of(model)}
        return plan.Plan.of(self.name, replace=replace)


def _clustered_layer(wrapper: Any) -> plan.PlainLayer:
    """The wrapped layer as a plain layer, each clustered weight at its nearest centroid."""
    weights = wrapper.layer.get_weights()  # those not clustered: TF-MOT holds the others
    for position, name in sorted(wrapper.position_original_weights.items()):
        algorithm = wrapper.clustering_algorithms[name]
        original = wrapper.original_clusterable_weights[name]
        indices = algorithm.get_pulling_indices(original)
        weights.insert(position, algorithm.get_clustered_weight(indices, original).numpy())
    layer = wrapper.layer
    return plan.PlainLayer(type(layer).__name__, layer.get_config(), weights)
