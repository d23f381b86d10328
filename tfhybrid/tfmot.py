"""Bridges to TF-MOT: quantization-aware training of a stripped model.

A stripped tfhybrid model is a plain Keras model, so TF-MOT's QAT applies as is;
this module picks the right scheme. A model that still carries pruned (exactly
zero) weights, e.g. from TF-MOT's `prune_low_magnitude`, gets the prune-preserving
scheme (PQAT), so fine-tuning in int8 does not bring the zeros back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot

from tfhybrid._keras import keras
from tfhybrid.training.model import refuse_search_model

#: A kernel with at least this share of exact zeros counts as pruned.
PRUNED_SHARE = 0.05


def quantize_aware(model: Any, preserve_sparsity: bool | None = None) -> keras.Model:
    """The TF-MOT quantization-aware-training model of a plain (stripped) model.

    Fine-tune it briefly, then `export_tflite(qat, path, quantize="int8", ...)`
    gives a fully int8 model with integer inputs and outputs (Edge TPU ready).

    Args:
        model: a plain tf_keras model, e.g. from `tfhybrid.strip` (not modified).
        preserve_sparsity: keep zero weights at zero (TF-MOT's prune-preserving QAT).
            None: decided from the weights (a Dense/Conv kernel with at least 5%
            exact zeros).

    Returns:
        The QAT model (uncompiled), starting from `model`'s weights.

    Raises:
        ValueError: for a model still under a tfhybrid search (strip it first), or a
            model TF-MOT cannot quantize (the layer and TF-MOT's reason are named).
    """
    refuse_search_model(model, "quantize_aware")
    if preserve_sparsity is None:
        preserve_sparsity = has_pruned_weights(model)
    qat = tfmot.quantization.keras
    try:
        if preserve_sparsity:
            scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
            return qat.quantize_apply(qat.quantize_annotate_model(model), scheme)
        return qat.quantize_model(model)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"TF-MOT cannot quantize model '{model.name}': {error}") from error


def has_pruned_weights(model: Any) -> bool:
    """True if a Dense/Conv kernel of `model` has at least `PRUNED_SHARE` exact zeros."""
    for layer in model.submodules:
        kernel = getattr(layer, "kernel", None)
        if isinstance(layer, keras.layers.Layer) and kernel is not None:
            values = np.asarray(kernel)
            if values.size and np.mean(values == 0) >= PRUNED_SHARE:
                return True
    return False


def quantize_scope():
    """Scope to load saved QAT models (`keras.models.load_model` inside it)."""
    return tfmot.quantization.keras.quantize_scope()
