"""What the DualTrack stages after stage 1 share: models from configs, sweep reading, evaluation.

Every stage evaluates the same way as stage 1: predictions over whole validation sweeps are
composed into a trajectory and scored with the original evaluator's metrics, next to the
no-motion and mean-motion predictors that a useful model must beat.
"""
from collections.abc import Callable, Mapping
import dataclasses
import functools
import os
from typing import Any

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import feature_cache
from dualtrack_jax import metrics
from dualtrack_jax import plots
from dualtrack_jax import pose
from dualtrack_jax.data import datasets
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import registry
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import transformer
from ultrasound_common import checkpoints
from ultrasound_common import errors

# The metric the README and the original's checkpoint selection use ("GPE" of the paper's tables).
GPE = 'ddf/5pt-avg_global_displacement_error'
# What the trivial predictors (`baseline/zero_motion/`, `baseline/mean_motion/`) report: the
# columns of a comparison table (the TUS-REC ones where the sweeps have landmarks).
BASELINE_KEYS = (GPE, 'ddf/all-pts-avg_global_displacement_error',
                 'ddf/all-pts-avg_local_displacement_error', 'drift/final_drift_rate',
                 'tusrec/GPE', 'tusrec/GLE', 'tusrec/LPE', 'tusrec/LLE')
# Pixels read per chunk when a sweep file is centre-cropped for prediction.
_CROP_READ_PIXELS = 1 << 24
# Keys of the whole-sweep pipeline that never go to the device (strings, float64 host metadata).
HOST_KEYS = ('sweep_id', 'tracking', 'pixel_to_image', 'sweep_index', 'targets_global')


@dataclasses.dataclass
class EvalResult:
  """What the runtime expects from `evaluate` (duck-typed: model packages never import launch):
  metrics and figures (one trajectory plot per sweep), plus the sweeps' trajectories."""
  metrics: dict[str, float]
  figures: dict[str, Any]
  sweeps: list[dict[str, Any]]


def module_kwargs(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model as keyword arguments of a module (lists become tuples, hashable)."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in model.items()}


def dtype(config: ml_collections.ConfigDict) -> Any:
  """The computation dtype, config.compute_dtype ('bfloat16' for the original's fp16 autocast)."""
  return jnp.dtype(config.get('compute_dtype', 'float32'))


def unit(images) -> jnp.ndarray:
  """uint8 frames -> [0, 1] float32 on device (frames travel as uint8: 4x less traffic)."""
  images = jnp.asarray(images)
  return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


def trajectory(relative_vectors: np.ndarray) -> np.ndarray:
  """(N-1, 6) relative pose vectors -> (N, 4, 4) global transforms, G_0 = I, in float64."""
  return pose.compose_relative(pose.pose_vector_to_matrix(np.asarray(relative_vectors, np.float64)))


def _pixel_translation(dx: float, dy: float) -> np.ndarray:
  m = np.eye(4)
  m[:2, 3] = dx, dy
  return m


def center_crops(reader: sweeps.SweepReader, crop: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(N, h, w) uint8 centre crops of a sweep file and the crop-to-file image transform (4, 4).

  Read a chunk at a time, so only the crops are held. The model predicts motion in the crop's
  centred frame, half a pixel off the file's centred frame when the sizes differ by an odd number
  of pixels; `conjugate` moves predictions into the file's frame.
  """
  image_hw = reader.image_shape
  if image_hw[0] < crop[0] or image_hw[1] < crop[1]:
    raise sweeps.SweepFileError(
        reader.path, sweeps.IMAGES, f'frames of {image_hw[0]}x{image_hw[1]} pixels are smaller '
        f'than the {crop[0]}x{crop[1]} centre crop this model was trained on')
  top, left = transforms.center_crop_params(image_hw, crop)
  chunk = max(1, _CROP_READ_PIXELS // (image_hw[0] * image_hw[1]))
  images = np.concatenate([
      reader.images(start, min(start + chunk, reader.num_frames))[
          :, top:top + crop[0], left:left + crop[1]]
      for start in range(0, reader.num_frames, chunk)])
  try:
    crop_to_image = transforms.crop(
        dict(images=np.broadcast_to(np.uint8(0), (1, *image_hw)), tracking=np.eye(4)[None],
             pixel_to_image=reader.pixel_to_image), top, left, crop)['tracking'][0]
  except ValueError as e:
    raise sweeps.SweepFileError(reader.path, sweeps.PIXEL_TO_IMAGE, str(e)) from e
  return images, crop_to_image


def conjugate(vectors: np.ndarray, crop_to_image: np.ndarray) -> np.ndarray:
  """Relative pose vectors predicted in the crop's frame -> the same motions in the file's frame."""
  relative = pose.pose_vector_to_matrix(np.asarray(vectors, np.float64))
  return pose.matrix_to_pose_vector(crop_to_image @ relative @ pose.invert_rigid(crop_to_image))


def global_frames(reader: sweeps.SweepReader, source: str, indices: np.ndarray) -> np.ndarray:
  """Global-encoder images (M, 224, 224) float32 of a sweep file at `indices` (preprocessing of
  the pipelines' `global_source`)."""
  if source == 'downsampled':
    return transforms.to_unit_float(reader.downsampled_at(indices))
  frames = transforms.to_unit_float(reader.images_at(indices))
  return (transforms.context_images(frames) if source == 'context'
          else transforms.resize(frames, transforms.GLOBAL_SIZE))


class SweepEvaluator:
  """Whole-sweep validation with the stage-1 metrics and the trivial baselines.

  Attributes:
    val_records, train_records: the sweeps (training sweeps give the mean-motion baseline).
    crop: the local centre crop (metrics are expressed in its centred frame, over the full frame's
      pixel grid, as the original evaluates the whole image's points).
    global_source: global images to add to each item (pipeline.GLOBAL_SOURCES) or None.
    spacing: evaluate the trajectory at every `spacing`-th frame only (the global encoder
      predicts motion between frames 0, 16, 32, ...); 1 = every frame.
    outline_every: draw the frame outline every this many frames in the trajectory plots
      (config.plot_outline_every; 0 = none).
    full_ddf: also the all-pixel DDF metrics ('ddf/all-pts-*', the original's
      --include_full_ddf_metrics) and, for sweeps whose files hold TUS-REC landmarks, the
      challenge's 'tusrec/*' (GPE, GLE, LPE, LLE and scores) on the landmarks of the evaluated
      frames (config.eval_full_ddf). Each metric is averaged over the sweeps that have it.
  """

  def __init__(self, val_records: list[registry.SweepRecord],
               train_records: list[registry.SweepRecord], *, crop: tuple[int, int],
               global_source: str | None = None, spacing: int = 1, outline_every: int = 0,
               full_ddf: bool = True):
    self.val_records, self.train_records = val_records, train_records
    self.crop, self.global_source, self.spacing = tuple(crop), global_source, spacing
    self.outline_every, self.full_ddf = outline_every, full_ddf
    self._paths = {r.sweep_id: r.path for r in val_records}
    self.image_hw = pipeline.SweepSource(val_records).image_shape
    self._baselines = None

  def _mean_motion(self) -> np.ndarray:
    vectors = []
    for record in self.train_records:
      with sweeps.SweepReader(record.path) as reader:
        vectors.append(pose.relative_pose_vectors(reader.tracking[::self.spacing]))
    return np.concatenate(vectors).mean(axis=0)

  def _landmarks(self, sweep_id: str) -> np.ndarray | None:
    """The sweep's landmarks on the evaluated frames (every `spacing`-th, renumbered), or None."""
    with sweeps.SweepReader(self._paths[sweep_id]) as reader:
      landmarks = reader.landmarks
    if landmarks is None:
      return None
    landmarks = landmarks[landmarks[:, 0] % self.spacing == 0]
    landmarks[:, 0] //= self.spacing
    return landmarks if len(landmarks) else None

  def __call__(self, predict: Callable[[dict], np.ndarray]) -> EvalResult:
    """Scores `predict(item) -> (M-1, 6)` relative pose vectors between the evaluated frames of a
    whole-sweep item (pipeline.whole_sweeps, batch axis removed, centre crop)."""
    val = pipeline.whole_sweeps(self.val_records, crop_hw=self.crop, seed=0, augment=None,
                                shuffle=False, num_epochs=1, global_source=self.global_source)
    mean_motion = self._mean_motion() if self._baselines is None else None
    top, left = transforms.center_crop_params(self.image_hw, self.crop)
    per_sweep, baselines, trajectories = [], [], []
    for batch in val:
      item = {k: v[0] for k, v in batch.items()}
      pixel_to_image = item['pixel_to_image'] @ _pixel_translation(-left, -top)
      gt = pose.global_transforms(item['tracking'][::self.spacing])
      pred = trajectory(predict(item))
      sweep_id = str(item['sweep_id'])
      score = functools.partial(
          metrics.sweep_metrics, gt_global=gt, pixel_to_image=pixel_to_image,
          image_shape=self.image_hw, all_pixels=self.full_ddf,
          landmarks=self._landmarks(sweep_id) if self.full_ddf else None)
      per_sweep.append(score(pred))
      if mean_motion is not None:
        n = len(gt)
        zero = np.broadcast_to(np.eye(4), (n, 4, 4))
        mean = trajectory(np.broadcast_to(mean_motion, (n - 1, 6)))
        for name, g in (('zero_motion', zero), ('mean_motion', mean)):
          baselines.append({f'baseline/{name}/{k}': v for k, v in score(g).items()
                            if k in BASELINE_KEYS})
      trajectories.append(dict(sweep_id=sweep_id, pred_global=pred, gt_global=gt,
                               pixel_to_image=pixel_to_image, image_shape=self.image_hw))
    if mean_motion is not None:
      keys = sorted({k for b in baselines for k in b})
      self._baselines = {k: float(np.mean([b[k] for b in baselines if k in b])) for k in keys}
    keys = sorted({k for m in per_sweep for k in m})
    result = {k: float(np.mean([m[k] for m in per_sweep if k in m])) for k in keys}
    figures = {f'trajectory/{s["sweep_id"]}': plots.trajectory_figure(
        s['pred_global'], s['gt_global'], title=s['sweep_id'], pixel_to_image=s['pixel_to_image'],
        image_shape=s['image_shape'], outline_every=self.outline_every) for s in trajectories}
    return EvalResult(metrics={**result, **self._baselines}, figures=figures,
                      sweeps=trajectories)


def normalize_global(images, mean_std) -> jnp.ndarray:
  """Global-encoder images in [0, 1] -> (x - mean) / std (config.data.global_normalize)."""
  mean, std = mean_std
  return (jnp.asarray(images, jnp.float32) - mean) / std


class LocalFromFeatures(nn.Module):
  """`dualtrack.LocalEncoder` after its frozen CNN + ViT: features -> [temporal BERT] -> head/proj.

  Submodules are named as LocalEncoder's ('temporal', 'vit_fc' / 'temporal_fc', 'proj'), so it
  applies to a LocalEncoder's variables. With the CNN and ViT frozen this equals the LocalEncoder
  on the images whose `feature_cache.frame_features` are given (training included: the frozen
  part runs in eval mode and without gradient there too).
  """
  local: Mapping[str, Any]  # LocalEncoder keyword arguments.

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False, head: bool = False):
    """(B, N, hidden) features -> (B, N-1, 6) stage-head poses if head, else LocalEncoder's
    features (projected when proj_features is set)."""
    enc = dualtrack.LocalEncoder(**self.local)
    x = features.astype(enc.dtype)
    if enc.stage == 3:
      x = transformer.BertEncoder(
          enc.temporal_layers, enc.temporal_heads, enc.temporal_intermediate, enc.max_positions,
          dropout=enc.dropout, dtype=enc.dtype, param_dtype=enc.param_dtype,
          attention_implementation=enc.attention_implementation, name='temporal')(
              x, deterministic=not train)
    if head:
      name = 'temporal_fc' if enc.stage == 3 else 'vit_fc'
      return transformer.torch_linear(6, enc.hidden, name=name, param_dtype=enc.param_dtype)(
          x.astype(jnp.float32))[:, 1:]
    if enc.proj_features is not None:
      x = transformer.torch_linear(enc.proj_features, enc.hidden, use_bias=False, name='proj',
                                   dtype=enc.dtype, param_dtype=enc.param_dtype)(x)
    return x


def subtree(variables: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The `prefix` ('/'-joined, '' = all) subtree of every collection that has it."""
  out = {}
  for collection, tree in variables.items():
    for part in filter(None, prefix.split('/')):
      tree = tree.get(part) if isinstance(tree, Mapping) else None
    if tree is not None:
      out[collection] = tree
  return out


class LocalExperimentBase:
  """What the local stages and fusion share: data, steps, evaluation, cached-feature training.

  Subclasses set `self.local` (LocalEncoder keyword arguments of the local branch, for the
  feature cache) and `global_source` (pipeline.GLOBAL_SOURCES or None) before calling
  `__init__`, and implement `predict(variables, item) -> (M-1, 6)` for the evaluated frames.
  """
  spacing = 1  # Evaluate the trajectory at every `spacing`-th frame.
  spacing_global = 0  # Gather the global images at this grid spacing on the host (0: none).

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.config = config
    self.crop = tuple(config.data.crop)
    self.train_records = self.val_records = self.evaluator = None
    if load_data:
      self.train_records = datasets.load_split(config.data, 'train')
      self.val_records = datasets.load_split(config.data, 'val')
      self.evaluator = SweepEvaluator(self.val_records, self.train_records, crop=self.crop,
                                      global_source=self.global_source, spacing=self.spacing,
                                      outline_every=config.get('plot_outline_every', 0),
                                      full_ddf=config.get('eval_full_ddf', True))

  @property
  def steps_per_epoch(self) -> int:
    # One element (window or whole sweep) per training sweep per epoch, the original's "one".
    return max(1, len(self.train_records) // self.config.batch_size)

  @property
  def augmentation(self) -> transforms.Augmentation | None:
    aug = self.config.data.get('augment')
    return transforms.Augmentation(**aug) if aug else None

  def features_from_cache(self) -> bool:
    """config.feature_cache.enabled, refused with image augmentations (see the configs)."""
    cache = self.config.get('feature_cache')
    if not (cache and cache.enabled):
      return False
    if self.augmentation is not None:
      raise errors.InputError(
          'config.feature_cache.enabled with config.data.augment set: cached features are those '
          'of the centre-cropped, unaugmented sweep, so no image augmentation can be applied; '
          'set config.data.augment = None or disable the cache')
    return True

  def feature_cache_source(self) -> tuple[dict[str, Any], str]:
    """(frozen variables, cache directory) of config.feature_cache.

    The frozen part comes from the run that `config.init_from.<feature_cache.source>` names, at
    `feature_cache.prefix` in its variables (it is frozen, so the run's own copy equals it).
    """
    cache = self.config.feature_cache
    name = cache.source
    if name not in (self.config.get('init_from') or {}):
      raise errors.InputError(
          f'config.feature_cache.source={name!r} is not a key of config.init_from '
          f'(has {sorted(self.config.get("init_from") or {})}); the cached features '
          'need the frozen weights of the previous stage')
    spec = self.config.init_from[name]
    if not spec.get('workdir'):
      raise errors.InputError(
          f'config.init_from.{name}.workdir is empty: set it to the run folder of '
          'the previous stage')
    variables = subtree(
        checkpoints.read_variables(spec.workdir, str(spec.get('checkpoint') or 'best')),
        cache.prefix)
    directory = cache.get('directory') or os.path.join(
        os.environ.get(datasets.CACHE_ENV) or datasets.DEFAULT_CACHE, 'features')
    return variables, directory

  def fill_feature_cache(self) -> tuple[str, str]:
    """Computes the missing cached features of the training sweeps; returns (directory, key).

    The frozen CNN + ViT are `feature_cache_source()`'s.
    """
    variables, directory = self.feature_cache_source()
    key = feature_cache.cache_key(self.local, variables, self.crop)
    computed = feature_cache.fill(
        feature_cache.FeatureCache(directory, key), self.train_records, self.local, variables,
        tile=self.config.eval_tile, read_crops=lambda r: center_crops(r, self.crop)[0])
    logging.info('Feature cache %s/%s: %d sweep(s) computed, %d reused.', directory, key,
                 computed, len(self.train_records) - computed)
    return directory, key

  def whole_sweep_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    """Whole training sweeps (batch 1), with cached features instead of images if configured."""
    cached = self.features_from_cache()
    ds = pipeline.whole_sweeps(
        self.train_records, crop_hw=self.crop, seed=seed, augment=self.augmentation,
        shuffle=True, global_source=self.global_source, shard_index=shard_index,
        shard_count=shard_count)
    if cached:
      ds = ds.map(feature_cache.ReplaceImages(*self.fill_feature_cache()))
    return ds.map(DeviceBatch(self.spacing_global))

  def local_features(self, variables: Mapping[str, Any], images: np.ndarray) -> jax.Array:
    """(1, N, hidden) frozen CNN + ViT features of (N, h, w) uint8 centre crops."""
    return feature_cache.frame_features(self.local, variables, unit(images[None]),
                                        tile=self.config.eval_tile)

  def evaluate(self, variables) -> EvalResult:
    return self.evaluator(lambda item: self.predict(variables, item))


@dataclasses.dataclass(frozen=True)
class DeviceBatch(grain.transforms.Map):
  """Drops the host-only keys; gathers the global images at the regular grid (`spacing` > 0), so
  that only the M sampled frames travel to the device."""
  spacing: int

  def map(self, batch: dict) -> dict:
    out = {k: v for k, v in batch.items() if k not in HOST_KEYS}
    if self.spacing and 'global_images' in out:
      grid = dualtrack.regular_grid_indices(out['global_images'].shape[1], self.spacing)
      out['global_images'] = out['global_images'][:, grid]
    return out


class SweepPrediction:
  """`predict_sweep` for the experiments that predict every frame's motion (`launch.predict`)."""

  def predict_sweep(self, variables, reader: sweeps.SweepReader) -> np.ndarray:
    """(N-1, 6) float64 relative pose vectors of a sweep file, in its own image frame."""
    images, crop_to_image = center_crops(reader, self.crop)
    item = dict(images=images)
    if self.global_source is not None:
      item['global_images'] = global_frames(
          reader, self.global_source,
          dualtrack.regular_grid_indices(reader.num_frames, self.config.model.get(
              'grid_spacing', 16)))
    return conjugate(self.predict(variables, item), crop_to_image)


class LocalStageExperiment(SweepPrediction, LocalExperimentBase):
  """Local stages 2 and 3: `dualtrack.LocalEncoder(**config.model)` with its stage's head."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.local = dict(module_kwargs(config.model), dtype=dtype(config))
    self.model = dualtrack.LocalEncoder(**self.local)
    self.head = LocalFromFeatures(self.local)
    self._head_poses = jax.jit(lambda variables, features: self.head.apply(
        variables, features, head=True))
    super().__init__(config, load_data=load_data)

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N-1, 6) relative pose vectors of a whole sweep item (centre crops)."""
    features = self.local_features(variables, item['images'])
    return np.asarray(self._head_poses(variables, features)[0], np.float64)
