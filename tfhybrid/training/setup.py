"""`hybrid_compress`'s work: analyse the model, let each technique take its layers,
rebuild the model once with every technique's training-time layers, and wrap it in a
`CompressionModel`."""

from __future__ import annotations

import json
from typing import Any

from tfhybrid import budget as budget_lib
from tfhybrid import channels, cost, graph, latency, schedules
from tfhybrid._keras import keras, nested_io
from tfhybrid.techniques import base
from tfhybrid.training import model as model_lib

#: What two techniques may both do to one layer: only thin its channels (with
#: anything else); two that change its weights would each overwrite the other's.
_SHAREABLE = "channels"


def compress(
    model: Any,
    budget: budget_lib.Budget,
    techniques: list[base.Technique],
    *,
    layers: list[str] | None = None,
    skip: tuple = (),
    search_steps: int | None = None,
    temperature: schedules.Schedule | None = None,
    penalty: schedules.Schedule | None = None,
    compression_optimizer: Any = None,
) -> model_lib.CompressionModel:
    """Wraps `model` for the techniques' search (see `tfhybrid.hybrid_compress`)."""
    if not isinstance(budget, budget_lib.Budget):
        raise TypeError(f"budget must be a tfhybrid.Budget, got {type(budget).__name__}.")
    if search_steps is not None and int(search_steps) < 1:
        raise ValueError(f"search_steps must be >= 1 (or None), got {search_steps}.")
    techniques = _fresh_copies(techniques)
    analysis = channels.analyze(model)
    if search_steps is not None:
        temperature = temperature or model_lib.default_temperature(int(search_steps))
        penalty = penalty or model_lib.default_penalty(int(search_steps))
    cost_model = _with_latency(cost.CostModel.from_analysis(analysis), budget)
    setup = base.Setup(
        analysis=analysis,
        budget=budget,
        cost_model=cost_model,
        original={k: float(v) for k, v in cost_model.costs().items()},
        layers=base.expand_names(analysis, "hybrid_compress(layers=...)", layers or ()),
        skip=base.expand_names(analysis, "hybrid_compress(skip=...)", skip),
        named=set(layers or ()) - set(analysis.nested),  # not through a nested model's name
        # Until the first fit sets the search's length (see CompressionModel.set_search_steps).
        temperature=schedules.serialize(temperature or model_lib.default_temperature(1)),
    )
    _check_claims(techniques, [t.select(setup) for t in techniques])
    for technique in techniques:
        technique.prepare(setup, techniques)
    settings = {
        "budget": budget.get_config(),
        "cost": cost_model.get_config(),
        "original": setup.original,
        "techniques": [base.serialize(t) for t in techniques],
        "penalty": penalty and schedules.serialize(penalty),
        # Given before the length is known (set by the first fit), else in the layers.
        "temperature": temperature and schedules.serialize(temperature),
        "search_steps": search_steps and int(search_steps),
        "optimizer": _optimizer_config(compression_optimizer),
    }
    plain = graph.rebuild(analysis.model, lambda op: _training_time_call(op, techniques))
    compressed = model_lib.CompressionModel(*nested_io(plain), settings, name=model.name)
    if not compressed.technique_layers():
        raise ValueError(
            f"No technique of {[t.name for t in techniques]} made a training-time layer; "
            "at least one must (its layers carry the search's step counters, see "
            "techniques.base.add_search_state)."
        )
    for technique in techniques:
        technique.initialize(compressed, model)
        if search_steps is not None:
            technique.set_search_steps(compressed, int(search_steps))
    return compressed


def _training_time_call(op: graph.Op, techniques: list) -> graph.Replacement | None:
    """What the rebuilt model calls for `op`: a technique's stand-in for its layer (or a
    copy of it), with every technique's ops on its outputs; None if none changes it.

    Raises:
        ValueError: if two techniques would each replace the layer.
    """
    stand_ins = {t.name: r for t in techniques if (r := t.replace_layer(op)) is not None}
    if len(stand_ins) > 1:
        raise ValueError(
            f"Layer '{op.layer.name}' would be replaced by training-time layers of "
            f"{' and '.join(stand_ins)}, and it can be only one's. Leave it to one, with "
            "the others' `skip=` (or `layers=`) option."
        )
    stand_in = next(iter(stand_ins.values()), None)
    start = stand_in or graph.copy_of(op.layer)
    wrapped = start
    for technique in techniques:
        wrapped = technique.wrap_outputs(op, wrapped)
    return wrapped if (stand_in is not None or wrapped is not start) else None


def _fresh_copies(techniques: list) -> list[base.Technique]:
    """Copies of the user's techniques (set-up keeps state on them; theirs stay as given).

    Raises:
        TypeError: for something that is not a technique.
        ValueError: for an empty list or one technique given twice.
    """
    if not techniques:
        raise ValueError("hybrid_compress(techniques=[]): give at least one, e.g. [tfhybrid.DF()].")
    for technique in techniques:
        if not isinstance(technique, base.Technique):
            raise TypeError(
                f"hybrid_compress(techniques=...) takes tfhybrid techniques such as "
                f"tfhybrid.DF(); got {type(technique).__name__}."
            )
    names = [t.name for t in techniques]
    if len(set(names)) < len(names):
        raise ValueError(
            f"hybrid_compress(techniques=...) names a technique twice ({names}); give each "
            "once, with `layers=`/`skip=` options of its own if it has them."
        )
    return [base.deserialize(base.serialize(t)) for t in techniques]


def _check_claims(techniques: list, claims: list[dict]) -> None:
    """Raises if two techniques would both change one layer's weights.

    Raises:
        ValueError: naming the layer, both techniques and what each would do.
    """
    seen: dict[str, tuple] = {}
    for technique, claimed in zip(techniques, claims):
        for layer, kind in claimed.items():
            if layer in seen and _SHAREABLE not in (kind, seen[layer][1]):
                raise ValueError(
                    f"Layer '{layer}' is claimed by two techniques: {seen[layer][0]} "
                    f"({seen[layer][1]}) and {technique.name} ({kind}). Leave it to one, with "
                    "the other's `skip=` (or `layers=`) option."
                )
            if layer not in seen or kind != _SHAREABLE:
                seen[layer] = (technique.name, kind)


def _optimizer_config(optimizer: Any) -> dict:
    """The JSON config of the compression optimizer (None: the default, Adam(1e-3)).

    Raises:
        ValueError: for something that is not a Keras optimizer or optimizer name.
    """
    if optimizer is None:
        return model_lib.DEFAULT_OPTIMIZER
    try:
        optimizer = keras.optimizers.get(optimizer)
    except ValueError as error:
        raise ValueError(
            f"hybrid_compress(compression_optimizer={optimizer!r}): give a Keras optimizer "
            f"or its name, e.g. keras.optimizers.Adam(1e-3). {error}"
        ) from error
    return json.loads(json.dumps(keras.optimizers.serialize(optimizer)))


def _with_latency(cost_model: cost.CostModel, budget: budget_lib.Budget) -> cost.CostModel:
    """The cost model, counting latency too where the budget gives a latency table."""
    if budget.latency_table is None:
        if budget.latency is not None:
            raise ValueError(
                f"Budget(latency={budget.latency}) needs the model's measured latency: pass "
                "latency_table=<a table from `python -m tfhybrid latency-table model.keras` "
                "or tfhybrid.measure_latency_table(model)>."
            )
        return cost_model
    return cost_model.with_latency(latency.as_table(budget.latency_table))
