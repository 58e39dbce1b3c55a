"""Baseline: the 2-frame CNN of Prevost et al. 2018 (DualTrack's train_2_frame_cnn.py).

Two frames stacked as channels go through an image CNN that regresses the 6-vector of their
relative pose. Training draws one random pair per sweep per epoch (the script's "tus_rec" epoch
mode), consecutive or, with probability `data.skip_frame_p`, one frame apart, with flips and
reversal (`pipeline.frame_pairs`); the loss is the MSE of the pose vector. At test time every
consecutive pair of the sweep is predicted and the N - 1 motions are chained into the trajectory
by `common.SweepEvaluator`, as the original's `compute_predictions_for_sweep`.

Departures from the script, on purpose: frames are cropped (random crop in training, centre crop
at test, as every DualTrack stage) rather than resized, so that the motion is expressed in the
same crop frame as the other methods' and the metrics compare; the script's horizontal flip
mirrors the rows (`torch.flip(dims=(1,))` of a (C, H, W) tensor) while changing the tracking as
for a column mirror, a bug replaced by `transforms.horizontal_flip`. Farneback optical-flow
channels (off in the README command) are not implemented.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models

BACKBONES = ('prevost',)
EXPERIMENT = 'the 2-frame CNN baseline (dualtrack_jax.experiments.baseline_two_frame)'


def pairs(images: np.ndarray) -> np.ndarray:
  """(N, h, w) frames -> (N - 1, h, w, 2): every consecutive pair stacked as channels."""
  return np.stack([images[:-1], images[1:]], axis=-1)


class Experiment(baselines.SweepPrediction, common.LocalExperimentBase):
  """2-frame CNN training and chained whole-sweep evaluation (`launch/experiment.py`)."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    baselines.check_choice(config, 'model.backbone', BACKBONES, EXPERIMENT)
    self.model = models.PrevostConvNet(norm=config.model.get('norm'),
                                       dropout=config.model.dropout,
                                       dtype=common.dtype(config))
    self._apply = jax.jit(lambda variables, x: self.model.apply(
        variables, baselines.normalize(x, config.data)))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.frame_pairs(
        self.train_records, crop_hw=self.crop, batch_size=self.config.batch_size, seed=seed,
        augment=self.augmentation, skip_p=self.config.data.skip_frame_p,
        shard_index=shard_index, shard_count=shard_count)

  def _inputs(self, batch) -> jax.Array:
    # (B, 2, h, w) uint8 pairs -> (B, h, w, 2) normalised channels.
    return baselines.normalize(jnp.moveaxis(jnp.asarray(batch['images']), 1, -1),
                               self.config.data)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init(rng, self._inputs(batch)))

  def loss_fn(self, variables, batch, rng):
    pred, updates = self.model.apply(variables, self._inputs(batch), train=True,
                                     rngs={'dropout': rng}, mutable=['batch_stats'])
    loss = losses.pose_mse(pred, batch['targets'][:, 0], weights=self.config.loss_weights)
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N - 1, 6) relative pose vectors of a whole sweep item: one per consecutive pair."""
    images = np.asarray(item['images'])
    baselines.require_frames(len(images), 2, f'sweep {item.get("sweep_id", "")}'.strip())
    poses = baselines.chunked(lambda x: self._apply(variables, x), pairs(images),
                              self.config.eval_batch_size)
    return np.asarray(poses, np.float64)
