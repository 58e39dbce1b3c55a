"""DualTrack local encoder stage 3 ("L3"): the temporal BERT.

CNN + ViT come from the stage-2 run (`config.init_from`) and are frozen; the relative-key temporal
BERT and its head `temporal_fc` learn from whole sweeps (batch 1, dropout 0.1). With
`config.feature_cache.enabled` the frozen CNN + ViT features of every training sweep are computed
once (`dualtrack_jax.feature_cache`) and training runs on them, as the original's legacy recipe;
the result is the same model, because frozen parts run in eval mode either way. The temporal BERT
and the original recipe: docs/dualtrack.md, sections "Architecture" and "Training recipes".
"""
import jax
import jax.numpy as jnp

from dualtrack_jax import losses
from dualtrack_jax.experiments import common


class Experiment(common.LocalStageExperiment):
  """Stage-3 training on whole sweeps (or cached features); see `launch/experiment.py`."""

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return self.whole_sweep_dataset(seed=seed, shard_index=shard_index, shard_count=shard_count)

  def init(self, rng: jax.Array, batch) -> dict:
    # Cached-feature batches carry no images: the variables only depend on the crop size.
    images = jnp.zeros((1, 2, *self.crop), jnp.float32)
    return dict(self.model.init(rng, images, train=False))

  def loss_fn(self, variables, batch, rng):
    rngs = {'dropout': rng}
    if 'features' in batch:
      pred = self.head.apply(variables, batch['features'], train=True, head=True, rngs=rngs)
      updates = {}
    else:
      pred, updates = self.model.apply(variables, common.unit(batch['images']), train=True,
                                       head=True, mutable=['batch_stats'], rngs=rngs)
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))
