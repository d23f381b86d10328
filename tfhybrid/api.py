"""The user's path: hybrid_compress, strip, custom_object_scope (thin orchestration)."""

from __future__ import annotations

from typing import Any

from tfhybrid import schedules, surgery
from tfhybrid._keras import keras
from tfhybrid.budget import Budget
from tfhybrid.techniques import df


def hybrid_compress(
    model: Any,
    budget: Budget,
    *,
    filters: bool = True,
    ranks: bool = True,
    layers: list[str] | None = None,
    skip: tuple | list = (),
    round_to: int = 1,
    search_steps: int = 2000,
    temperature: schedules.Schedule | None = None,
    penalty: schedules.Schedule | None = None,
) -> df.HybridModel:
    """Prepares `model` to learn which filters and ranks to keep under `budget` (DF).

    The returned model starts from `model`'s weights; fit it with
    `callbacks=[tfhybrid.CompressionScheduler()]`. For `search_steps` batches the
    channel masks and ranks are soft and a budget penalty joins the loss; then the
    decisions become hard (projected so the budget holds) and training fine-tunes
    the frozen structure. `strip` returns the plain, smaller model.

    Args:
        model: a functional or built Sequential tf_keras model (not modified).
        budget: e.g. `Budget(macs=0.1)`: the share of MACs and/or params to keep.
        filters: learn which channels to remove (DML-S).
        ranks: learn the rank of each Dense/Conv2D layer (DTL-S).
        layers: only these layers (producers of channel groups, factored layers); a
            nested model's name stands for all its layers. Layers named here that can
            be compressed neither way are named in a warning, with the reasons.
        skip: never compress these layers (or groups they belong to); a nested
            model's name stands for all its layers.
        round_to: keep channel counts and ranks multiples of this (e.g. 8).
        search_steps: batches of soft search before the decisions freeze.
        temperature: schedule of the masks' and ranks' temperature (default: 1 ->
            0.05 exponentially over the search).
        penalty: schedule of the budget penalty's weight (default: 0 -> 5 over the
            first quarter of the search).

    Returns:
        A `HybridModel` (a functional keras.Model): compile and fit it.

    Raises:
        ValueError: for a budget outside (0, 1], a name in `layers` or `skip` that
            is neither a layer nor a nested model of `model`, nothing compressible
            (with the reason per group), or a budget below the model's incompressible
            part.
    """
    return df.compress(
        model,
        budget,
        filters=filters,
        ranks=ranks,
        layers=layers,
        skip=tuple(skip),
        round_to=round_to,
        search_steps=search_steps,
        temperature=temperature,
        penalty=penalty,
    )


def strip(model: df.HybridModel) -> Any:
    """The plain, physically smaller Keras model that `model`'s decisions describe.

    Channels whose masks are off are removed, factored layers become one layer or
    a split pair (whichever needs fewer MACs). If the search is still running, its
    current decisions, projected onto the budget, are used; `model` is not changed.

    Args:
        model: a model returned by `hybrid_compress` (possibly trained, saved, loaded).

    Returns:
        A plain functional `keras.Model` computing what `model` computes with its
        hard decisions.
    """
    if not isinstance(model, df.HybridModel):
        raise TypeError(
            f"strip takes a model made by tfhybrid.hybrid_compress; got "
            f"{type(model).__name__} '{getattr(model, 'name', '?')}'."
        )
    return surgery.strip(model, *model.materialize())


def custom_object_scope() -> Any:
    """A scope in which `keras.models.load_model` knows tfhybrid's classes.

    Use it to load a compressed model saved mid-search (`.keras` or `.h5`):
    `with tfhybrid.custom_object_scope(): model = keras.models.load_model(path)`.
    """
    from tfhybrid.surgery import ChannelMask

    classes = [
        df.HybridModel,
        df.ChannelGates,
        df.FactoredDense,
        df.FactoredConv2D,
        ChannelMask,
        schedules.ExponentialDecay,
        schedules.LinearRamp,
    ]
    return keras.utils.custom_object_scope({cls.__name__: cls for cls in classes})
