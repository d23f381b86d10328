"""The user's path: hybrid_compress, strip, custom_object_scope (thin orchestration)."""

from __future__ import annotations

import warnings
from typing import Any

from tfhybrid import schedules, surgery
from tfhybrid._keras import keras
from tfhybrid.budget import Budget
from tfhybrid.techniques import base
from tfhybrid.training import setup
from tfhybrid.training.model import CompressionModel

#: hybrid_compress's options that belong to the default technique (DF), with defaults.
_DF_OPTIONS = {"filters": True, "ranks": True, "round_to": 1}


def hybrid_compress(
    model: Any,
    budget: Budget,
    techniques: list[base.Technique] | None = None,
    *,
    filters: bool = True,
    ranks: bool = True,
    layers: list[str] | None = None,
    skip: tuple | list = (),
    round_to: int = 1,
    search_steps: int | None = None,
    temperature: schedules.Schedule | None = None,
    penalty: schedules.Schedule | None = None,
    compression_optimizer: Any = None,
) -> CompressionModel:
    """Prepares `model` to learn its compression under `budget` inside `fit`.

    The returned model starts from `model`'s weights; fit it with
    `callbacks=[tfhybrid.CompressionScheduler()]`. For `search_steps` batches the
    techniques' decisions are soft and a budget penalty joins the loss; then the
    decisions become hard (projected so the budget holds) and training fine-tunes
    the frozen structure. `strip` returns the plain, smaller model.

    Args:
        model: a functional or built Sequential tf_keras model (not modified).
        budget: e.g. `Budget(macs=0.1)`: the share of MACs, params, storage bits
            and/or measured latency (`Budget(latency=..., latency_table=...)`) to keep.
        techniques: the techniques to stack, e.g. `[tfhybrid.DF()]` (None: DF with the
            `filters`, `ranks` and `round_to` given here).
        filters: (DF) learn which channels to remove (DML-S).
        ranks: (DF) learn the rank of each Dense/Conv2D layer (DTL-S).
        layers: only these layers (producers of channel groups, factored layers); a
            nested model's name stands for all its layers. Layers named here that can
            be compressed neither way are named in a warning, with the reasons.
        skip: never compress these layers (or groups they belong to); a nested
            model's name stands for all its layers.
        round_to: (DF) keep channel counts and ranks multiples of this (e.g. 8).
        search_steps: batches of soft search before the decisions freeze; None: the
            first half of the first `fit` (its epochs times its steps per epoch).
        temperature: schedule of the soft decisions' temperature (default: 1 -> 0.05
            exponentially over the search).
        penalty: schedule of the budget penalty's weight (default: 0 -> 5 over the
            first quarter of the search).
        compression_optimizer: the optimizer of the techniques' own variables (mask
            logits, rank thresholds): a Keras optimizer or its name, default
            Adam(1e-3). The optimizer the model is compiled with trains the weights
            only, so the search behaves the same under SGD, Adam or RMSprop.

    Returns:
        A `CompressionModel` (a functional keras.Model): compile and fit it.

    Raises:
        ValueError: for a budget outside (0, 1], a name in `layers` or `skip` that
            is neither a layer nor a nested model of `model`, nothing compressible
            (with the reason per group), a budget below the model's incompressible
            part, two techniques claiming one layer's weights, DF's options given
            beside `techniques`, or a latency budget without a latency table (or with
            one measured on another model).
    """
    given = {"filters": filters, "ranks": ranks, "round_to": round_to}
    if techniques is None:
        techniques = [base.deserialize({"name": "df", "config": given})]
    elif given != _DF_OPTIONS:
        changed = {k: v for k, v in given.items() if v != _DF_OPTIONS[k]}
        raise ValueError(
            f"hybrid_compress({', '.join(f'{k}={v!r}' for k, v in changed.items())}) are DF's "
            "options: with techniques=[...], give them to tfhybrid.DF(...) instead."
        )
    return setup.compress(
        model,
        budget,
        list(techniques),
        layers=layers,
        skip=tuple(skip),
        search_steps=search_steps,
        temperature=temperature,
        penalty=penalty,
        compression_optimizer=compression_optimizer,
    )


def strip(model: CompressionModel) -> Any:
    """The plain, physically smaller Keras model that `model`'s decisions describe.

    Each technique states its decisions as a plan (DF: channels whose masks are off
    are removed, factored layers become one layer or a split pair, whichever needs
    fewer MACs); the merged plan is carried out. If the search is still running,
    its current decisions, projected onto the budget, are used (with a warning);
    `model` is not changed.

    Args:
        model: a model returned by `hybrid_compress` (possibly trained, saved, loaded).

    Returns:
        A plain functional `keras.Model` computing what `model` computes with its
        hard decisions.
    """
    if not isinstance(model, CompressionModel):
        raise TypeError(
            f"strip takes a model made by tfhybrid.hybrid_compress; got "
            f"{type(model).__name__} '{getattr(model, 'name', '?')}'."
        )
    if not model.search_finished():
        warnings.warn(
            f"strip: model '{model.name}' is still searching ({model.search_progress()}): "
            "its decisions are soft, so the plain model takes their current values, "
            "projected onto the budget. Fit until the search ends for the searched ones.",
            stacklevel=2,
        )
    return surgery.strip(model, model.plan())


def custom_object_scope() -> Any:
    """A scope in which `keras.models.load_model` knows tfhybrid's classes.

    Use it to load a compressed model saved mid-search (`.keras` or `.h5`):
    `with tfhybrid.custom_object_scope(): model = keras.models.load_model(path)`.
    Every class registered for serialization under the package "tfhybrid" (the
    techniques' layers, schedules, the compression model) is in it.
    """
    registered = keras.saving.get_custom_objects()
    prefix = "tfhybrid>"
    ours = {k[len(prefix) :]: v for k, v in registered.items() if k.startswith(prefix)}
    return keras.utils.custom_object_scope(ours)
