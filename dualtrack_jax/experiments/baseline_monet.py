"""Baseline: MoNet image-only (Luo et al. 2023; DualTrack's run_monet_baseline.py reproduction).

A causal 2-frame video ResNet-18, the spatial mean, a 4-layer LSTM and a linear head
(`models.baselines.MoNet`) learn from random 64-frame windows, one per sweep per epoch, with the
loss MSE + (1 - Pearson correlation) of the relative pose vectors. Test: whole sweeps; the CNN
runs in exact temporal tiles (its context is frames t - 1 and t) and the LSTM over the whole
sweep, and the first output is dropped, so an N-frame sweep gives N - 1 motions.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax import tiling
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models


class Experiment(baselines.SweepPrediction, common.LocalExperimentBase):
  """MoNet training on windows and whole-sweep evaluation (`launch/experiment.py`)."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.model = models.MoNet(**common.module_kwargs(config.model), dtype=common.dtype(config))
    self._features = jax.jit(lambda variables, x: self.model.apply(
        variables, baselines.normalize(x, config.data), method='features'))
    self._head = jax.jit(lambda variables, f: self.model.apply(variables, f, method='head'))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.local_windows(
        self.train_records, window=self.config.data.window, crop_hw=self.crop,
        batch_size=self.config.batch_size, seed=seed, augment=self.augmentation,
        shard_index=shard_index, shard_count=shard_count)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init(rng, baselines.normalize(batch['images'], self.config.data)))

  def loss_fn(self, variables, batch, rng):
    del rng  # No dropout.
    pred, updates = self.model.apply(
        variables, baselines.normalize(batch['images'], self.config.data), train=True,
        mutable=['batch_stats'])
    mse = losses.pose_mse(pred, batch['targets'])
    corr = baselines.correlation_loss(pred, batch['targets'])
    loss = mse + self.config.correlation_weight * corr
    return loss, ({'mse': mse, 'correlation_loss': corr}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N - 1, 6) relative pose vectors of a whole sweep item (centre crops)."""
    images = np.asarray(item['images'])
    baselines.require_frames(len(images), 2, f'sweep {item.get("sweep_id", "")}'.strip())
    features = tiling.tiled_temporal_apply(
        lambda x: self._features(variables, x), jnp.asarray(images[None]),
        tile=self.config.eval_tile, halo=self.model.temporal_radius)
    return np.asarray(self._head(variables, features)[0], np.float64)
