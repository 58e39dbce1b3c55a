"""DualTrack local encoder stage 1 ("L1") as an experiment of `launch.train`.

The 3D video ResNet-18 with a spatial mean and a 6-vector head learns the motion between
consecutive frames from random K-frame windows (MSE on relative pose vectors). Validation runs the
model over whole sweeps with exact temporal tiling, composes the predicted motions into a trajectory
and reports the original evaluator's metrics, next to two trivial predictors that a useful model
must beat: no motion (identity transforms) and the mean motion of the training sweeps. The
original recipe: docs/dualtrack.md, section "Training recipes".
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import export as export_lib
from dualtrack_jax import losses
from dualtrack_jax.data import datasets
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms
from dualtrack_jax.experiments import common
from dualtrack_jax.models import local_encoder


class Experiment:
  """Stage-1 training and whole-sweep evaluation; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    """Builds the model and, unless `load_data` is False (prediction only), reads the dataset."""
    self.config = config
    self.model = local_encoder.LocalEncoderStage1(
        widths=tuple(config.model.widths), stem_width=config.model.stem_width,
        temporal_kernels=tuple(config.model.temporal_kernels),
        target_mean=tuple(config.model.target_mean), target_std=tuple(config.model.target_std),
        dtype=jnp.dtype(config.compute_dtype), causal=config.model.get('causal', False),
        conv3d_implementation=config.model.get('conv3d_implementation', 'frame_conv'))
    self.train_records = self.val_records = self.evaluator = None
    if load_data:
      self.train_records = datasets.load_split(config.data, 'train')
      self.val_records = datasets.load_split(config.data, 'val')
      self.evaluator = common.SweepEvaluator(
          self.val_records, self.train_records, crop=tuple(config.data.crop),
          outline_every=config.get('plot_outline_every', 0),
          full_ddf=config.get('eval_full_ddf', True))

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

  def evaluate(self, variables) -> common.EvalResult:
    return self.evaluator(lambda item: self.predict(variables, item['images']))

  def export_spec(self, variables, options) -> dict[str, Any]:
    """`launch.export`: raw uint8 frames -> pose vectors (dualtrack_jax/export.py)."""
    return export_lib.stage1_spec(self.model, variables, tuple(self.config.data.crop), options)
