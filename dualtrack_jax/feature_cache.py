"""Per-frame features of the frozen local CNN + ViT, computed once per sweep and cached on disk.

From local stage 3 on, the 3D CNN and the ViT are frozen (eval-mode BN, no gradient), so their
64-d per-frame output depends only on the frozen weights and the preprocessing. Computing it once
per sweep makes stage-3 and fusion epochs cheap (the CNN is >99 % of the local encoder's FLOPs);
the original's legacy recipe also trained stage 3 on cached features (`export_features`).

Layout: `<directory>/<key>/<sweep_id>.h5` with dataset 'features' (N, 64) float32, where `key` is
a hash of the frozen weights (every array of the CNN and ViT subtrees, params and BN statistics)
and of the preprocessing (centre crop, CNN chunking, module configuration). A changed weight or
crop gives a new key, so stale features are never read. Files are written to a temporary name
and renamed, so a killed run never leaves a partial file behind.

Features are computed as at evaluation: centre crops of the whole sweep, and the CNN over the
whole sweep with exact temporal tiling (equal to one pass), or the 2025 model's inexact
`torch.chunk` chunking when the model uses it.
"""
from collections.abc import Mapping
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import grain
import h5py
import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax import tiling
from dualtrack_jax.data import sweeps
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer
from ultrasound_common import errors
from ultrasound_common import files

FEATURES = 'features'
_VERSION = 1  # Bump when the feature computation changes.
# LocalEncoder attributes that the CNN + ViT features depend on.
_FEATURE_FIELDS = ('cnn_widths', 'cnn_stem_width', 'cnn_temporal_kernels', 'cnn_chunking',
                   'max_subsequence', 'vit_feature_map_size', 'vit_patch_size', 'vit_layers',
                   'vit_heads', 'vit_intermediate', 'hidden')


class FrameFeatures(nn.Module):
  """CNN -> per-frame ViT CLS token, eval mode: the frozen part of `dualtrack.LocalEncoder`.

  Its submodules are named as LocalEncoder's ('cnn', 'vit'), so it applies to a LocalEncoder's
  variables (the other subtrees are ignored).
  """
  local: Mapping[str, Any]  # LocalEncoder keyword arguments (only _FEATURE_FIELDS are read).

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, T, H, W) float frames in [0, 1] -> (B, T, hidden) features (no chunking here)."""
    kw = {f: self.local[f] for f in _FEATURE_FIELDS if f in self.local}
    defaults = dualtrack.LocalEncoder(**{k: v for k, v in kw.items()
                                         if k not in ('cnn_chunking', 'max_subsequence')})
    frames = images[..., None] if images.ndim == 4 else images
    batch, num_frames = frames.shape[:2]
    maps = resnet3d.VideoResNet(defaults.cnn_widths, defaults.cnn_stem_width,
                                defaults.cnn_temporal_kernels, name='cnn')(frames, train=False)
    return transformer.ViTEncoder(
        defaults.vit_feature_map_size, defaults.vit_patch_size, defaults.hidden,
        defaults.vit_layers, defaults.vit_heads, defaults.vit_intermediate, name='vit')(
            maps.reshape(batch * num_frames, *maps.shape[2:])).reshape(batch, num_frames, -1)


def _hashable(local: Mapping[str, Any]) -> tuple:
  return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in local.items()))


@functools.partial(jax.jit, static_argnums=0)
def _window_features(local: tuple, variables: Any, window: jax.Array) -> jax.Array:
  # Jitted once per window shape: eager tiling compiles once for every sweep length.
  return FrameFeatures(dict(local)).apply(variables, window)


def frame_features(local: Mapping[str, Any], variables: Mapping[str, Any], images: jax.Array, *,
                   tile: int) -> jax.Array:
  """(B, N, hidden) frozen CNN + ViT features of whole sweeps, as LocalEncoder computes them.

  Args:
    local: LocalEncoder keyword arguments.
    variables: the LocalEncoder's variables (only 'cnn' and 'vit' are read).
    images: (B, N, H, W) float frames in [0, 1].
    tile: frames per tile of the exact tiling (memory bound; the result does not depend on it).
  """
  key = _hashable(local)
  subset = {c: {k: v for k, v in tree.items() if k in ('cnn', 'vit')}
            for c, tree in variables.items()}
  fn = functools.partial(_window_features, key, subset)
  if local.get('cnn_chunking') == 'torch_chunk':
    return tiling.chunked_temporal_apply(fn, images, max_len=local['max_subsequence'])
  radius = resnet3d.VideoResNet(temporal_kernels=tuple(
      local.get('cnn_temporal_kernels', resnet3d.LARGE_WINDOW))).temporal_radius
  return tiling.tiled_temporal_apply(fn, images, tile=tile, halo=radius)


def cache_key(local: Mapping[str, Any], variables: Mapping[str, Any], crop: tuple[int, int]) -> str:
  """Hash of the frozen CNN + ViT weights and everything else the features depend on."""
  digest = hashlib.sha256()
  settings = {f: local.get(f) for f in _FEATURE_FIELDS}
  settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
  digest.update(json.dumps(dict(settings, crop=list(crop), version=_VERSION),
                           sort_keys=True).encode())
  for collection in sorted(variables):
    for part in ('cnn', 'vit'):
      tree = variables[collection].get(part)
      if tree is not None:
        digest_arrays(digest, f'{collection}/{part}', tree)
  return digest.hexdigest()[:16]


def digest_arrays(digest, label: str, tree: Any) -> None:
  """Adds every array of `tree` (its path under `label`, dtype, shape and bytes) to `digest`."""
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda x: jax.tree_util.keystr(x[0])):
    array = np.asarray(leaf)
    digest.update(f'{label}{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}'.encode())
    digest.update(array.tobytes())


class FeatureCache:
  """The cached features of one key: `path(sweep_id)`, `load`, `ensure`."""

  def __init__(self, directory: str, key: str):
    self.directory = os.path.join(os.path.expanduser(directory), key)

  def path(self, sweep_id: str) -> str:
    return os.path.join(self.directory, f'{sweep_id}.h5')

  def load(self, sweep_id: str) -> np.ndarray:
    """(N, hidden) float32 features of a sweep (ensure() must have written them)."""
    path = self.path(sweep_id)
    try:
      with h5py.File(path, 'r') as f:
        return np.asarray(f[FEATURES], np.float32)
    except (OSError, KeyError) as e:
      raise errors.MissingFileError(
          f'{path}: no cached {FEATURES!r} ({e}); the cache must be filled '
          'before training (FeatureCache.ensure)') from e

  def ensure(self, sweep_id: str, num_frames: int, compute) -> bool:
    """Writes the features of a sweep unless present; returns whether they were computed.

    `compute()` -> (N, hidden) features; a file with another frame count is recomputed.
    """
    path = self.path(sweep_id)
    if os.path.exists(path):
      with h5py.File(path, 'r') as f:
        if FEATURES in f and f[FEATURES].shape[0] == num_frames:
          return False
    os.makedirs(self.directory, exist_ok=True)
    features = np.asarray(compute(), np.float32)
    if features.shape[0] != num_frames:
      raise errors.InputError(f'{path}: computed {features.shape[0]} feature frames for a sweep of '
                              f'{num_frames}')
    with files.atomic_output(path) as tmp, h5py.File(tmp, 'w') as f:
      f.create_dataset(FEATURES, data=features)
    return True


def fill(cache: FeatureCache, records, local: Mapping[str, Any], variables, *, tile: int,
         read_crops) -> int:
  """Computes the missing features of `records`; returns how many sweeps were computed.

  `read_crops(reader) -> (N, h, w) uint8` gives a sweep's centre crops.
  """
  computed = 0
  for record in records:
    with sweeps.SweepReader(record.path) as reader:
      def compute(reader=reader):
        images = jnp.asarray(read_crops(reader)[None], jnp.float32) / 255.0
        return frame_features(local, variables, images, tile=tile)[0]
      computed += cache.ensure(record.sweep_id, reader.num_frames, compute)
  return computed


@dataclasses.dataclass(frozen=True)
class ReplaceImages(grain.transforms.Map):
  """Whole-sweep batch (batch 1) -> the same with 'features' (1, N, hidden) instead of 'images'."""
  directory: str
  key: str

  def map(self, batch: dict) -> dict:
    out = {k: v for k, v in batch.items() if k != 'images'}
    out[FEATURES] = FeatureCache(self.directory, self.key).load(str(batch['sweep_id'][0]))[None]
    return out
