"""Constrained training by ADMM: the state and updates that techniques share.

A technique that trains weights W toward a set S (unified or pruned blocks, an LC
combination) keeps, per constrained tensor, an auxiliary Z in S and a scaled dual U:

- W-step: ordinary training with `admm_penalty` added to the loss,
  rho / 2 * ||W - Z + U||^2;
- Z-step: Z = Proj_S(W + U), the Euclidean projection, the technique's own maths;
- U-step: U = U + W - Z.

rho rises on a schedule (`schedules`), so W is pulled ever closer to S, and at the
end the technique projects W onto S itself. Z and U are non-trainable variables of the
technique's training-time layer, so a model saved mid-ADMM resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def admm_penalty(w: tf.Tensor, z: tf.Tensor, u: tf.Tensor, rho: tf.Tensor) -> tf.Tensor:
    """rho / 2 * ||w - z + u||^2: how far the weights are from their constrained copy."""
    return 0.5 * rho * tf.reduce_sum(tf.square(w - z + u))


def admm_update(
    w: tf.Tensor, z: tf.Variable, u: tf.Variable, project: Callable[[tf.Tensor], tf.Tensor]
) -> None:
    """One Z-step and U-step: z = project(w + u), then u = u + w - z."""
    new_z = project(w + u)
    z.assign(new_z)
    u.assign(u + w - new_z)


def relative_distance(w: tf.Tensor, z: tf.Tensor) -> float:
    """||w - z|| / ||w||: how far the weights still are from their constrained copy."""
    return float(tf.norm(w - z) / tf.maximum(tf.norm(w), 1e-12))
