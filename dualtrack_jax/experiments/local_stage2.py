"""DualTrack local encoder stage 2 ("L2"): the per-frame ViT.

The stage-1 CNN (initialised from the stage-1 run through `config.init_from`) is frozen: eval-mode
batch norm and no gradient, as the original's `FrozenModuleWrapper`; the ViT and its pose head
`vit_fc` learn frame-to-frame motion from random windows (MSE on relative pose vectors), with the
stage-1 data pipeline and augmentations. Evaluation as stage 1, on whole validation sweeps.
The ViT and the original recipe: docs/dualtrack.md, sections "Architecture" and "Training recipes".
"""
import jax

from dualtrack_jax import losses
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import common


class Experiment(common.LocalStageExperiment):
  """Stage-2 training on windows, whole-sweep evaluation; see `launch/experiment.py`."""

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.local_windows(
        self.train_records, window=self.config.data.window, crop_hw=self.crop,
        batch_size=self.config.batch_size, seed=seed, augment=self.augmentation,
        shard_index=shard_index, shard_count=shard_count)

  def init(self, rng: jax.Array, batch) -> dict:
    return dict(self.model.init(rng, common.unit(batch['images']), train=False))

  def loss_fn(self, variables, batch, rng):
    del rng  # No dropout in the ViT (HF ViTConfig's 0.0).
    pred, updates = self.model.apply(variables, common.unit(batch['images']), train=True,
                                     head=True, mutable=['batch_stats'])
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))
