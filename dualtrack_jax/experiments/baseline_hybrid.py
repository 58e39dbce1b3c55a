"""Baseline: the hybrid transformer of Ning et al. 2022 (DualTrack's run_ning_et_al_reprod.py).

Per-frame features of a causal small-window video ResNet-18 -> linear -> learned absolute
positions -> 12-layer BERT -> 6-vector (`models.baselines.HybridTransformer`), trained on whole
sweeps (batch 1, dropout 0.1) with the MSE of the relative pose vectors.

Two recipes (configs/dualtrack/baseline_hybrid.py):
- end to end (the paper's, the README's first command): CNN and transformer learn together;
- two-stage (the README's recommended one): the causal CNN is first trained as a stage-1 local
  encoder (configs/dualtrack/local_stage1.py with model.causal=True and the small window), then
  loaded through `config.init_from` and frozen (`cnn_frozen`): it runs in eval mode without
  gradient and only the transformer learns, which is the model that the original trains on its
  exported features. (The features are recomputed every step rather than cached: the feature
  cache of `dualtrack_jax/feature_cache.py` is keyed to DualTrack's local encoder.)
Test: whole sweeps, the CNN in exact temporal tiles (its context is causal), the transformer over
the whole sweep, the first output dropped: N - 1 motions for N frames, N <= model.max_positions.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax import tiling
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models
from ultrasound_common import errors


class Experiment(baselines.SweepPrediction, common.LocalExperimentBase):
  """Hybrid transformer training on whole sweeps and whole-sweep evaluation."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.model = models.HybridTransformer(**common.module_kwargs(config.model),
                                          dtype=common.dtype(config))
    self._features = jax.jit(lambda variables, x: self.model.apply(
        variables, baselines.normalize(x, config.data), method='features'))
    self._sequence = jax.jit(lambda variables, f: self.model.apply(variables, f,
                                                                   method='sequence'))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return self.whole_sweep_dataset(seed=seed, shard_index=shard_index, shard_count=shard_count)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init(rng, jnp.zeros((1, 2, *self.crop), jnp.float32)))

  def loss_fn(self, variables, batch, rng):
    frames = baselines.normalize(batch['images'], self.config.data)
    rngs = {'dropout': rng}
    if self.config.cnn_frozen:
      # The pretrained CNN as in the original's exported features: eval mode, no gradient.
      features = jax.lax.stop_gradient(self.model.apply(variables, frames, method='features'))
      pred = self.model.apply(variables, features, train=True, method='sequence', rngs=rngs)
      updates = {}
    else:
      pred, updates = self.model.apply(variables, frames, train=True, rngs=rngs,
                                       mutable=['batch_stats'])
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N - 1, 6) relative pose vectors of a whole sweep item (centre crops)."""
    images = np.asarray(item['images'])
    what = f'sweep {item.get("sweep_id", "")}'.strip()
    baselines.require_frames(len(images), 2, what)
    if len(images) > self.model.max_positions:
      raise errors.InputError(f'{what}: {len(images)} frames exceed the {self.model.max_positions} '
                              'learned positions of the model (config.model.max_positions)')
    features = tiling.tiled_temporal_apply(
        lambda x: self._features(variables, x), jnp.asarray(images[None]),
        tile=self.config.eval_tile, halo=self.model.temporal_radius)
    return np.asarray(self._sequence(variables, features)[0], np.float64)
