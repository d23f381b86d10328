"""LC: kernels trained toward a compressed form by the learning-compression algorithm.

After Carreira-Perpiñán & Idelbayev, "Model compression as constrained optimization, with
application to neural nets" (Part V: combining compressions, arXiv 2107.04380), and their
toolkit. Each part of `LC(parts=...)` names one layer or several (compressed jointly: one
codebook, one pruning budget) and a compression Δ(Θ) from `techniques.compressions`,
possibly an additive combination such as `Quantize(2) + Prune(keep=0.01)`.

The algorithm, as it runs inside `fit` with `CompressionScheduler`:

- start: direct compression, Δ = the C step of the pretrained weights, λ = 0;
- L step: the epochs train the weights w with the loss plus μ/2·||w − Δ − λ/μ||²
  (`constraints.admm_penalty` with the scaled multiplier u = −λ/μ);
- C step, after every epoch of the search: Δ = the C step of w − λ/μ (an exact
  projection; its penalty forms weighed by μ), then λ ← λ − μ·(w − Δ);
- μ rises geometrically from `mu[0]` to `mu[1]` over the search's steps (the toolkit
  multiplies it by a constant after each C step);
- end of the search: a last C step (over the channels the other techniques keep), and the
  kernels become Δ: the layers compute with Δ from then on (their biases still train), and
  `strip` gives each layer with Δ as its kernel (a quantized kernel holds its codebook's
  values, a pruned one its zeros; a low-rank one is split into its factor pair where that
  stores less, an additive one into its parts), which `th.save_compact` writes in the bits
  counted.

Storage is counted as LC counts it (`compressions`): the cost model takes each kernel's
non-zeros and bits from the last C step, so `Budget(bits=...)` reads them; MACs stay dense.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import constraints, graph, plan, schedules
from tfhybrid._keras import call_with_kernel, is_factorable, keras
from tfhybrid.blocks import kernel_of
from tfhybrid.techniques import base
from tfhybrid.techniques.compressions import (
    Additive,
    Compression,
    LowRank,
    deserialize,
    serialize,
)
from tfhybrid.techniques.sparse import with_inner_weights

L = keras.layers
#: μ's default (start, end): the toolkit's LeNet-300 run starts at 9.76e-5 and grows
#: 1.1x per C step over 40 of them (to about 4e-3) in 800 epochs. A search of 20 epochs
#: must end higher for the weights to reach Δ: on LeNet-300-100 with k = 2 quantization,
#: an end of 1e-2 left 3.36% test error, 1e-1 2.47% and 1 2.41% (docs/lc.md).
DEFAULT_MU = (1e-4, 1e-1)
#: The layers whose kernel LC trains (exactly these classes: `call_with_kernel` computes them).
TRAINED = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv2D)


@keras.utils.register_keras_serializable(package="tfhybrid")
class LCWrapper(L.Wrapper):
    """A Dense, Conv2D or DepthwiseConv2D trained by LC toward its compressed kernel.

    It computes with its own kernel w during the search and with Δ once the search has
    ended. Δ (`target`), λ (`multipliers`) and the kernel's counted non-zeros and bits
    are non-trainable weights, saved with it, so a search resumes where it stopped.

    Args:
        layer: the layer.
        mu: schedule config of the penalty's weight μ over the search (see `schedules`).
        parts: the parts of an additive compression (1 otherwise); their values are kept
            apart too (`part_0`, ...), for `strip`.
    """

    def __init__(self, layer, mu, parts=1, **kwargs):
        super().__init__(layer, **kwargs)
        self.mu = schedules.deserialize(mu)
        self.parts = int(parts)

    def build(self, input_shape):
        if not self.layer.built:
            with tf.name_scope(self.layer.name):  # its own names, for the optimizer's slots
                self.layer.build(input_shape)
        shape = tuple(self.kernel.shape)
        self.target = self.add_weight("target", shape=shape, initializer="zeros", trainable=False)
        self.multipliers = self.add_weight(
            "multipliers", shape=shape, initializer="zeros", trainable=False
        )
        self.counted = self.add_weight(  # (non-zero params, bits) of Δ, as LC counts them
            "counted", shape=(2,), dtype=tf.float64, initializer="zeros", trainable=False
        )
        self.part_values = [
            self.add_weight(f"part_{i}", shape=shape, initializer="zeros", trainable=False)
            for i in range(self.parts if self.parts > 1 else 0)
        ]
        base.add_search_state(self)
        super().build(input_shape)

    @property
    def kernel(self) -> tf.Variable:
        """The layer's kernel (a DepthwiseConv2D's depthwise kernel)."""
        return kernel_of(self.layer)

    def call(self, inputs, training=None):  # noqa: ARG002 - Keras passes training
        kernel = tf.where(self.decided > 0, self.target, self.kernel)
        return call_with_kernel(self.layer, inputs, kernel)

    def penalty(self) -> tf.Tensor:
        """μ/2·||w − Δ − λ/μ||² at the current step; zero once decided."""
        mu = self.mu(self.step)
        weight = tf.where(self.decided > 0, 0.0, mu)
        return constraints.admm_penalty(self.kernel, self.target, -self.multipliers / mu, weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "mu": schedules.serialize(self.mu), "parts": self.parts}

    def compression_note(self) -> str:
        return "trained by LC toward its compressed kernel"


@base.register_technique
class LC(base.Technique):
    """Kernels compressed by the learning-compression algorithm (see the module).

    Args:
        parts: {layer name, or a tuple of layer names compressed jointly: compression},
            e.g. `{"fc1": Quantize(2) + Prune(keep=0.01), ("fc2", "fc3"): Quantize(4)}`.
        mu: (start, end) of the penalty's weight μ, rising geometrically over the
            search; end > start.

    Raises:
        ValueError: for no parts, a layer in two parts, a part that names no layer, a
            compression that is not one, or a μ that does not rise.
    """

    name = "lc"

    def __init__(self, parts: dict, mu: tuple = DEFAULT_MU):
        if isinstance(parts, list):  # from `get_config`
            parts = {tuple(names): deserialize(c) for names, c in parts}
        if not parts:
            raise ValueError("LC(parts={}): name the layers to compress and how.")
        self.parts: dict[tuple, Compression] = {}
        seen: dict[str, tuple] = {}
        for key, compression in parts.items():
            names = (key,) if isinstance(key, str) else tuple(key)
            if not names or not isinstance(compression, Compression):
                raise ValueError(
                    f"LC(parts=...): {key!r} -> {compression!r}: give a layer name (or a tuple "
                    "of them) and a compression such as th.Quantize(2) + th.Prune(keep=0.01)."
                )
            for name in names:
                if name in seen:
                    raise ValueError(
                        f"LC(parts=...): layer '{name}' is in two parts, {seen[name]} and "
                        f"{names}; give each layer one compression (an additive one sums "
                        "several)."
                    )
                seen[name] = names
            self.parts[names] = compression
        if len(mu) != 2 or not 0 < mu[0] < mu[1]:
            raise ValueError(
                f"LC(mu={mu!r}): give (start, end) with 0 < start < end: LC needs μ to rise "
                "so that the weights end at their compressed form."
            )
        self.mu = (float(mu[0]), float(mu[1]))

    def get_config(self) -> dict:
        return {
            "parts": [[list(names), serialize(c)] for names, c in self.parts.items()],
            "mu": list(self.mu),
        }

    # -- set-up ------------------------------------------------------------------------
    def select(self, setup: base.Setup) -> dict[str, str]:
        layers = {layer.name: layer for layer in setup.analysis.model.layers}
        for names, compression in self.parts.items():
            base.expand_names(setup.analysis, "LC(parts=...)", names)
            for name in names:
                if not setup.allowed(name):
                    raise ValueError(
                        f"LC(parts=...) names layer '{name}', which hybrid_compress's "
                        "`layers=`/`skip=` leave out; drop it from the parts or from skip."
                    )
                _check_layer(layers[name], compression)
        return {name: "weights" for names in self.parts for name in names}

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        if not any(op.layer.name in names for names in self.parts):
            return None
        mu = schedules.ExponentialDecay(*self.mu, 1)  # set_search_steps stretches it
        compression = next(c for names, c in self.parts.items() if op.layer.name in names)
        wrapper = LCWrapper(
            graph.clone_layer(op.layer),
            schedules.serialize(mu),
            len(compression.parts) if isinstance(compression, Additive) else 1,
            name=f"lc_{op.layer.name}",
        )
        return with_inner_weights(wrapper, op.layer.get_weights())

    def initialize(self, model: Any, original: Any) -> None:
        """Direct compression: Δ the C step of the weights, λ zero."""
        self._c_step(model, update_multipliers=False)

    # -- training ----------------------------------------------------------------------
    def layers_of(self, model: Any) -> list:
        return [layer for layer in model.layers if isinstance(layer, LCWrapper)]

    def set_search_steps(self, model: Any, steps: int) -> None:
        """μ rises over the search."""
        for wrapper in self.layers_of(model):
            wrapper.mu = schedules.ExponentialDecay(*self.mu, steps)

    def loss(self, model: Any) -> tf.Tensor | None:
        return tf.add_n([w.penalty() for w in self.layers_of(model)])

    def on_epoch_end(self, model: Any, epoch: int) -> None:
        """A C step and the multipliers' update, while the search runs."""
        if not model.search_finished():
            self._c_step(model, update_multipliers=True)

    def finish(self, model: Any) -> None:
        """A last C step over the weights `strip` keeps (within the channels the other
        techniques keep, e.g. DF's); the kernels become Δ, zero in removed channels."""
        self._c_step(model, update_multipliers=False, kept=base.kept_kernel_channels(model))
        for wrapper in self.layers_of(model):
            wrapper.kernel.assign(wrapper.target)

    def _c_step(self, model: Any, update_multipliers: bool, kept: dict | None = None) -> None:
        """Δ = the C step of w − λ/μ for every part; then, if asked, λ ← λ − μ(w − Δ).

        With `kept` (`base.kept_kernel_channels`), the C step sees each Dense or Conv
        kernel's kept input and output channels only, and Δ is zero in the others (which
        `strip` removes), so the count is that of the stored kernel."""
        wrappers = {w.layer.name: w for w in self.layers_of(model)}
        for names, compression in self.parts.items():
            chosen = [wrappers[name] for name in names]
            mu = float(chosen[0].mu(chosen[0].step))
            weights = [w.kernel.numpy() for w in chosen]
            regions = [_region(w.layer, (kept or {}).get(w.layer.name)) for w in chosen]
            shifted = [
                region.of(k - w.multipliers.numpy() / mu)
                for k, w, region in zip(weights, chosen, regions)
            ]
            found = compression.project(shifted, mu)
            sizes = np.array([k.size for k in shifted], float)
            for index, (wrapper, kernel, region) in enumerate(zip(chosen, weights, regions)):
                value = region.placed(found.values[index], kernel.shape)
                wrapper.target.assign(value)
                for variable, part in zip(wrapper.part_values, found.parts):
                    variable.assign(region.placed(part[index], kernel.shape))
                share = found.bits * sizes[index] / sizes.sum()  # a joint codebook's, by size
                wrapper.counted.assign([np.count_nonzero(value), share])
                if update_multipliers:
                    wrapper.multipliers.assign(wrapper.multipliers - mu * (kernel - value))

    def decisions(self, model: Any, hard: bool = False) -> base.Decisions:
        """Each kernel's non-zeros and bits as the last C step counted them."""
        return base.Decisions(
            stored={w.layer.name: (w.counted[0], w.counted[1]) for w in self.layers_of(model)}
        )

    def plan(self, model: Any) -> plan.Plan:
        """Each layer with Δ as its kernel, split at Δ's rank where that is cheaper for a
        low-rank compression; for an additive compression its parts apart (`_parts`);
        mid-search, Δ of the last C step."""
        replace, ranks = {}, {}
        for wrapper in self.layers_of(model):
            layer = wrapper.layer
            compression = next(c for n, c in self.parts.items() if layer.name in n)
            if wrapper.part_values:
                replace[wrapper.name] = _parts(wrapper, compression.parts)
                continue
            weights = [w.numpy() for w in layer.weights]
            weights[0] = wrapper.target.numpy()
            replace[wrapper.name] = plan.PlainLayer.of(layer, weights)
            if isinstance(compression, LowRank) and is_factorable(layer):
                rank = _rank_of(weights[0])[-1]
                if rank:  # a zero kernel stays whole
                    ranks[layer.name] = rank
        return plan.Plan.of(self.name, replace=replace, ranks=ranks)

    def scalars(self, model: Any) -> dict[str, float]:
        """How far each kernel is from its compressed form, ||w − Δ|| / ||w||, and μ."""
        figures = {}
        for wrapper in self.layers_of(model):
            distance = constraints.relative_distance(wrapper.kernel, wrapper.target)
            figures[f"lc/distance/{wrapper.layer.name}"] = distance
            figures["lc/mu"] = float(wrapper.mu(wrapper.step))
        return figures


def _parts(wrapper: LCWrapper, compressions: list[Compression]) -> plan.Parallel:
    """The layer of an additive compression as `plan.Parallel` parts, summed by an `Add`
    of its name: a low-rank part of a Dense or Conv2D as a factor pair at its rank
    (`<name>_part<i>_in`, `_out`), every other part as the layer with that part's values
    as its kernel (`<name>_part<i>`); the bias on the first part."""
    layer = wrapper.layer
    plain = {"class_name": type(layer).__name__, "config": layer.get_config()}
    bias = [w.numpy() for w in layer.weights[1:]]
    branches = []
    for index, (compression, variable) in enumerate(zip(compressions, wrapper.part_values)):
        name, values = f"{layer.name}_part{index}", variable.numpy()
        extra = [] if branches else bias
        if isinstance(compression, LowRank) and is_factorable(layer):
            u, s, vt, rank = _rank_of(values)
            rank = max(rank, 1)
            pair = plan.factor_pair(plain, name, u[:, :rank] * s[:rank], vt[:rank], extra)
            branches.append(pair)
        else:
            branches.append((plan.part_of(plain, name, [values, *extra]),))
    return plan.Parallel(layer.name, tuple(branches), plain["config"].get("activation"))


@dataclasses.dataclass(frozen=True)
class _Region:
    """The kept input (`rows`, axis −2) and output (`cols`, axis −1) channels of a kernel;
    None: all of that axis."""

    rows: np.ndarray | None = None
    cols: np.ndarray | None = None

    def of(self, kernel: np.ndarray) -> np.ndarray:
        """The kept sub-kernel (its shape's axes in order, fewer channels)."""
        sub = kernel if self.rows is None else np.take(kernel, self.rows, axis=-2)
        return sub if self.cols is None else np.take(sub, self.cols, axis=-1)

    def placed(self, sub: np.ndarray, shape: tuple) -> np.ndarray:
        """`sub` in a float32 kernel of `shape`, zero outside the kept channels."""
        rows = np.arange(shape[-2]) if self.rows is None else np.asarray(self.rows)
        cols = np.arange(shape[-1]) if self.cols is None else np.asarray(self.cols)
        full = np.zeros(shape, np.float32)
        full[..., rows[:, None], cols[None, :]] = sub
        return full


def _region(layer: Any, kept: tuple | None) -> _Region:
    """The region of `layer`'s kernel a C step sees: the kept channels of a Dense or Conv
    kernel; all of a depthwise kernel (whose last axis is not its output channels)."""
    if kept is None or type(layer) is L.DepthwiseConv2D:
        return _Region()
    return _Region(*kept)


def _rank_of(kernel: np.ndarray) -> tuple:
    """(u, s, vt, rank): the SVD of `kernel` as a matrix (its last axis the columns) and
    its numerical rank (singular values above 1e-5 of the largest; 0 for a zero kernel)."""
    u, s, vt = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), full_matrices=False)
    return u, s, vt, int(np.sum(s > s[0] * 1e-5)) if s[0] > 0 else 0


def _check_layer(layer: Any, compression: Compression) -> None:
    """Raises unless `layer` has a kernel LC can train and `compression` fits it.

    Raises:
        ValueError: naming the layer, for a layer without a Dense, Conv or depthwise
            kernel, or a rank above its kernel's.
    """
    if type(layer) not in TRAINED:
        raise ValueError(
            f"LC(parts=...): layer '{layer.name}' ({type(layer).__name__}) has no Dense, "
            "Conv or DepthwiseConv2D kernel LC can train; leave it out of the parts."
        )
    kernel = kernel_of(layer)
    rows, cols = math.prod(kernel.shape[:-1]), int(kernel.shape[-1])
    ranks = [p.rank for p in getattr(compression, "parts", [compression]) if isinstance(p, LowRank)]
    too_high = [r for r in ranks if r is not None and r > min(rows, cols)]
    if too_high:
        raise ValueError(
            f"LC(parts=...): LowRank({too_high[0]}) for layer '{layer.name}', whose kernel as "
            f"a {rows} x {cols} matrix has rank at most {min(rows, cols)}."
        )
