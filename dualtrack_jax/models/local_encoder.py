"""DualTrack local encoder, stage 1 ("L1"): video CNN -> per-frame pose head.

Port of `VideoResnetTrackingEstimator`: the 3D ResNet of `resnet3d.py` (submodule `backbone`), a
spatial mean over the layer4 feature map, `fc` Dense(6) per frame, and the first time step dropped,
so output k is the pose vector of T_k^-1 T_{k+1}. Parameter paths mirror the torch keys
(`backbone.layer1.0.conv1.0.weight` -> `backbone/layer1/0/conv1/0/kernel`,
`fc.weight` -> `fc/kernel`). Its original training recipe is in docs/dualtrack.md, section
"Training recipes".
"""
from collections.abc import Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtrack_jax import tiling
from dualtrack_jax.models import resnet3d


def _torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
  """torch.nn.Linear's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), used for `fc`."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LocalEncoderStage1(nn.Module):
  """Stage-1 local encoder: per-frame relative pose vectors from a window of frames.

  Attributes: as `resnet3d.VideoResNet` (widths, stem_width, temporal_kernels, dtype, param_dtype),
  and `target_mean`, `target_std`: the pose is `fc(features) * target_std + target_mean`, so `fc`
  regresses standardised targets. None (the original) is `fc(features)` itself. `causal`: the
  CNN's temporal convs see past frames only (`vidrn18_small_window_trck_reg_causal`, the hybrid
  transformer baseline's CNN). `conv3d_implementation` and `fold_batch_norm`: the CNN's
  (resnet3d.py; the latter with variables from `resnet3d.fold_batch_norm`).
  The pooled features and `fc` are computed in float32 whatever `dtype` is: the head is tiny and
  its outputs are regressed in mm and degrees.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 45
  temporal_kernels: Sequence[int] = resnet3d.LARGE_WINDOW
  target_mean: Sequence[float] | None = None
  target_std: Sequence[float] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @property
  def temporal_radius(self) -> int:
    """Frames on each side that influence one output frame (17 for the released network)."""
    return resnet3d.VideoResNet(temporal_kernels=self.temporal_kernels).temporal_radius

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               per_frame: bool = False) -> jax.Array:
    """Predicts relative pose vectors.

    Args:
      images: float frames in [0, 1] (the caller divides uint8 by 255), (B, T, H, W) or
        (B, T, H, W, 1).
      train: batch norm in training mode (batch statistics, `batch_stats` updated).
      per_frame: return all T outputs (B, T, 6) instead of dropping the first. Frame outputs
        depend only on frames within `temporal_radius`, so this is the function to tile over a
        long sweep (see `predict_sweep`).

    Returns:
      (B, T - 1, 6) [tx, ty, tz mm, rx, ry, rz deg] of T_k^-1 T_{k+1}, or (B, T, 6) if per_frame.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'LocalEncoderStage1: images must be float in [0, 1], got {images.dtype} '
                       '(divide uint8 frames by 255 first)')
    if images.ndim == 4:
      images = images[..., None]
    if images.ndim != 5 or images.shape[-1] != 1:
      raise ValueError('LocalEncoderStage1: images must be (B, T, H, W) or (B, T, H, W, 1), '
                       f'got shape {images.shape}')
    features = resnet3d.VideoResNet(
        self.widths, self.stem_width, self.temporal_kernels, dtype=self.dtype,
        param_dtype=self.param_dtype, causal=self.causal,
        conv3d_implementation=self.conv3d_implementation, fold_batch_norm=self.fold_batch_norm,
        name='backbone')(images, train=train)
    pooled = features.astype(jnp.float32).mean(axis=(2, 3))
    poses = nn.Dense(6, kernel_init=_torch_linear_init(pooled.shape[-1]),
                     bias_init=_torch_linear_init(pooled.shape[-1]), param_dtype=self.param_dtype,
                     name='fc')(pooled)
    if self.target_std is not None:
      poses = poses * jnp.asarray(self.target_std, jnp.float32)
    if self.target_mean is not None:
      poses = poses + jnp.asarray(self.target_mean, jnp.float32)
    return poses if per_frame else poses[:, 1:]


def predict_sweep(model: LocalEncoderStage1, variables: Any, images: jax.Array, *, tile: int,
                  halo: int | None = None) -> jax.Array:
  """Whole-sweep inference (eval mode) with bounded memory, equal to one call on the whole sweep.

  Args:
    model: the stage-1 module.
    variables: its {'params', 'batch_stats'}.
    images: (B, N, H, W[, 1]) float frames in [0, 1].
    tile: output frames per window; windows are tile + 2 * halo frames long.
    halo: context frames on each side; defaults to (and must be at least) the model's
      temporal receptive radius, which is what makes the result exact.

  Returns:
    (B, N - 1, 6) relative pose vectors, as `model.apply(variables, images)`.
  """
  radius = model.temporal_radius
  halo = radius if halo is None else halo
  if halo < radius:
    raise ValueError(f"predict_sweep: halo={halo} is below the model's temporal receptive "
                     f"radius {radius}; tiled outputs would differ from the whole-sweep ones")
  frame_poses = tiling.tiled_temporal_apply(
      functools.partial(_per_frame_poses, model, variables), images, tile=tile, halo=halo)
  return frame_poses[:, 1:]


@functools.partial(jax.jit, static_argnums=0)
def _per_frame_poses(model: LocalEncoderStage1, variables: Any, window: jax.Array) -> jax.Array:
  # Jitted once per (model, window shape): eager tiling then compiles once for every sweep length.
  return model.apply(variables, window, per_frame=True)
