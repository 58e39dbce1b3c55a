"""Training losses of DualTrack (docs/dualtrack.md, section "Training recipes")."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def pose_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None,
             weights: Sequence[float] | jax.Array | None = None) -> jax.Array:
  """Mean squared error between pose vectors, over all elements.

  As the original: translations (mm) and rotations (degrees) mixed, unweighted, no normalisation.
  `weights` multiplies each component's squared error (the mean is still over all elements, so
  all-ones weights are the original loss). With a mask, the mean is over the valid steps only
  (the original's NaN-masked `nanmean` over padded sequences); unlike `nanmean`, a batch with no
  valid step gives 0, not NaN, so a fully padded batch cannot poison the parameters.

  Args:
    pred: (..., D) predictions, e.g. (B, T, 6).
    target: targets of the same shape.
    mask: optional (...) validity of each step, e.g. (B, T) bool or 0/1; masked-out steps may hold
      any value, NaN included.
    weights: optional (D,) per-component weights, e.g. [tx, ty, tz, rx, ry, rz].

  Returns:
    Scalar float32 loss.
  """
  if pred.shape != target.shape:
    raise ValueError(f'pose_mse: pred shape {pred.shape} != target shape {target.shape}')
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  squared = jnp.square(diff)
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != pred.shape[-1:]:
      raise ValueError(f'pose_mse: weights shape {weights.shape} must be ({pred.shape[-1]},)')
  if mask is None:
    return (squared if weights is None else squared * weights).mean()
  if mask.shape != pred.shape[:-1]:
    raise ValueError(f'pose_mse: mask shape {mask.shape} must be pred shape without its last '
                     f'axis, {pred.shape[:-1]}')
  valid = jnp.broadcast_to(mask.astype(bool)[..., None], diff.shape)
  # Zero the difference itself (not its square) so that NaN padding gives zero gradients too.
  squared = jnp.square(jnp.where(valid, diff, 0.0))
  if weights is not None:
    squared = squared * weights
  return squared.sum() / jnp.maximum(valid.sum(), 1)
