"""DualTrack local encoder stage 1 ("L1", spec section 13) as an experiment of `launch.train`.

The 3D video ResNet-18 with a spatial mean and a 6-vector head learns the motion between
consecutive frames from random K-frame windows (MSE on relative pose vectors). Validation runs the
model over whole sweeps with exact temporal tiling, composes the predicted motions into a trajectory
and reports the original evaluator's metrics, next to two trivial predictors that a useful model
must beat: no motion (identity transforms) and the mean motion of the training sweeps.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax import metrics
from dualtrack_jax import pose
from dualtrack_jax.data import datasets
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms
from dualtrack_jax.experiments import common
from dualtrack_jax.models import local_encoder

# The metric the README and the original's checkpoint selection use ("GPE" of the paper's tables).
GPE = 'ddf/5pt-avg_global_displacement_error'


@dataclasses.dataclass
class EvalResult:
  """What the trainer expects from `evaluate` (duck-typed: model packages never import launch)."""
  metrics: dict[str, float]
  sweeps: list[dict[str, Any]]


def _pixel_translation(dx: float, dy: float) -> np.ndarray:
  m = np.eye(4)
  m[:2, 3] = dx, dy
  return m


def _trajectory(relative_vectors: np.ndarray) -> np.ndarray:
  """(N-1, 6) relative pose vectors -> (N, 4, 4) global transforms, G_0 = I, in float64."""
  return pose.compose_relative(pose.pose_vector_to_matrix(np.asarray(relative_vectors, np.float64)))


class Experiment:
  """Stage-1 training and whole-sweep evaluation; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    """Builds the model and, unless `load_data` is False (prediction only), reads the dataset."""
    self.config = config
    self.model = local_encoder.LocalEncoderStage1(
        widths=tuple(config.model.widths), stem_width=config.model.stem_width,
        temporal_kernels=tuple(config.model.temporal_kernels),
        target_mean=tuple(config.model.target_mean), target_std=tuple(config.model.target_std),
        dtype=jnp.dtype(config.compute_dtype))
    self.train_records = self.val_records = self._val_image_hw = None
    if load_data:
      self.train_records = datasets.load_split(config.data, 'train')
      self.val_records = datasets.load_split(config.data, 'val')
      # One frame size for all validation sweeps (SweepSource checks it), read once.
      self._val_image_hw = pipeline.SweepSource(self.val_records).image_shape
    self._baselines = None

  @property
  def steps_per_epoch(self) -> int:
    # One random window per training sweep per epoch, as the original's "one" sampling mode.
    return max(1, len(self.train_records) // self.config.batch_size)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    augment = transforms.Augmentation(**self.config.data.augment)
    return pipeline.local_windows(
        self.train_records, window=self.config.data.window, crop_hw=tuple(self.config.data.crop),
        batch_size=self.config.batch_size, seed=seed, augment=augment, shard_index=shard_index,
        shard_count=shard_count)  # The trainer adds `config.num_workers` worker processes.

  @staticmethod
  def _images(batch) -> jax.Array:
    # Frames travel as uint8 (4x less host-to-device traffic) and become [0, 1] floats on device.
    return jnp.asarray(batch['images'], jnp.float32) / 255.0

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init(rng, self._images(batch), train=False))

  def loss_fn(self, variables, batch, rng):
    del rng  # Stage 1 has no dropout.
    pred, updates = self.model.apply(variables, self._images(batch), train=True,
                                     mutable=['batch_stats'])
    # Errors in units of each component's target spread (`model.target_std`), then weighted.
    std = jnp.asarray(self.config.model.target_std, jnp.float32)
    loss = losses.pose_mse(pred / std, batch['targets'] / std, weights=self.config.loss_weights)
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, images: np.ndarray) -> np.ndarray:
    """(N, h, w) uint8 centre-cropped frames -> (N-1, 6) relative pose vectors of the sweep."""
    images = jnp.asarray(images[None], jnp.float32) / 255.0
    poses = local_encoder.predict_sweep(self.model, variables, images, tile=self.config.eval_tile)
    return np.asarray(poses[0], np.float64)

  def predict_sweep(self, variables, reader: sweeps.SweepReader) -> np.ndarray:
    """(N-1, 6) float64 relative pose vectors of a sweep file, in its own image frame.

    The frames are centre-cropped to `config.data.crop` as in validation (read a chunk at a time,
    so only the crops are held). The model predicts motion in the crop's centred frame, which is
    half a pixel off the file's centred frame when the image and crop sizes differ by an odd
    number of pixels; the motions are conjugated into the file's frame (the sweep's
    `pixel_to_image`), in which the caller composes, compares and reconstructs.
    """
    images, crop_to_image = common.center_crops(reader, tuple(self.config.data.crop))
    return common.conjugate(self.predict(variables, images), crop_to_image)

  def _mean_motion(self) -> np.ndarray:
    """Mean relative pose vector of the training sweeps (the 'mean motion' predictor)."""
    vectors = []
    for record in self.train_records:
      with sweeps.SweepReader(record.path) as reader:
        vectors.append(pose.relative_pose_vectors(reader.tracking))
    return np.concatenate(vectors).mean(axis=0)

  def evaluate(self, variables) -> EvalResult:
    crop = tuple(self.config.data.crop)
    val = pipeline.whole_sweeps(self.val_records, crop_hw=crop, seed=0, augment=None,
                                shuffle=False, num_epochs=1)
    mean_motion = self._mean_motion() if self._baselines is None else None
    per_sweep, baselines, plots = [], [], []
    for item in val:
      images, tracking = item['images'][0], item['tracking'][0]
      image_hw = self._val_image_hw
      # Metrics on the full frame's pixel grid, expressed in the crop's centred frame (in which the
      # tracking and the predictions live): the original evaluates the whole image's points.
      top, left = transforms.center_crop_params(image_hw, crop)
      pixel_to_image = item['pixel_to_image'][0] @ _pixel_translation(-left, -top)
      gt = pose.global_transforms(tracking)
      pred = _trajectory(self.predict(variables, images))
      per_sweep.append(metrics.sweep_metrics(pred, gt, pixel_to_image, image_hw))
      if mean_motion is not None:
        n = len(tracking)
        baselines.append({
            f'baseline/zero_motion/{GPE}': metrics.sweep_metrics(
                np.broadcast_to(np.eye(4), (n, 4, 4)), gt, pixel_to_image, image_hw)[GPE],
            f'baseline/mean_motion/{GPE}': metrics.sweep_metrics(
                _trajectory(np.broadcast_to(mean_motion, (n - 1, 6))), gt, pixel_to_image,
                image_hw)[GPE]})
      plots.append(dict(sweep_id=str(item['sweep_id'][0]), pred_global=pred, gt_global=gt,
                        pixel_to_image=pixel_to_image, image_shape=image_hw))
    if mean_motion is not None:
      self._baselines = {k: float(np.mean([b[k] for b in baselines])) for k in baselines[0]}
    result = {k: float(np.mean([m[k] for m in per_sweep])) for k in per_sweep[0]}
    return EvalResult(metrics={**result, **self._baselines}, sweeps=plots)
