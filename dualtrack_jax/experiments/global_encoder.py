"""DualTrack global-encoder pretraining ("G", spec sections 4 and 13).

The per-frame 2D ResNet-18, projection, absolute position embedding and BERT learn the motion
between consecutive sampled frames (`pred_mode="local"`) from 64 sorted random frames per sweep
(`pipeline.global_samples`, flips and reversals), all parameters trainable. Validation: whole
sweeps sampled on the fusion model's regular grid (frames 0, 16, 32, ...), the trajectory at those
frames scored with the stage-1 metrics and baselines. (The original validates on 64 random frames
per sweep; the grid is deterministic and is what the global encoder sees inside DualTrack.)
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import common
from dualtrack_jax.models import dualtrack


class Experiment(common.LocalExperimentBase):
  """Global-encoder pretraining; see `launch/experiment.py` for the protocol.

  No `predict_sweep`: the global encoder alone predicts motion between every 16th frame only.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.global_source = config.data.global_source
    self.spacing = config.data.grid_spacing
    self.model = dualtrack.GlobalEncoder(**common.module_kwargs(config.model),
                                         dtype=common.dtype(config))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.global_samples(
        self.train_records, num_samples=self.config.data.num_samples,
        batch_size=self.config.batch_size, seed=seed, augment=self.augmentation,
        global_source=self.global_source, shard_index=shard_index,
        shard_count=shard_count).map(common.DeviceBatch(0))

  def _images(self, images) -> jax.Array:
    return common.normalize_global(images, self.config.data.global_normalize)

  def init(self, rng: jax.Array, batch) -> dict:
    return dict(self.model.init(rng, self._images(batch['global_images']), batch['indices'],
                                train=False))

  def loss_fn(self, variables, batch, rng):
    pred, updates = self.model.apply(
        variables, self._images(batch['global_images']), batch['indices'], train=True,
        head=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(M-1, 6) pose vectors between the grid frames of a whole-sweep item."""
    num_frames = len(item['images'])
    grid = dualtrack.regular_grid_indices(num_frames, self.spacing)
    images = item['global_images']
    images = images[grid] if len(images) == num_frames else images
    poses = _predict(self.model, variables, self._images(images[None]), jnp.asarray(grid[None]))
    return np.asarray(poses[0], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: dualtrack.GlobalEncoder, variables, images, indices) -> jax.Array:
  return model.apply(variables, images, indices, head=True)
