"""Baseline: the hybrid transformer of Ning et al. 2022 (DualTrack's run_ning_et_al_reprod.py).

Per-frame features of a causal small-window video ResNet-18 -> linear -> learned absolute
positions -> 12-layer BERT -> 6-vector (`models.baselines.HybridTransformer`), trained on whole
sweeps (batch 1, dropout 0.1) with the MSE of the relative pose vectors.

Two recipes (configs/dualtrack/baseline_hybrid.py):
- end to end (the paper's, the README's first command): CNN and transformer learn together;
- two-stage (the README's recommended one): the causal CNN is first trained as a stage-1 local
  encoder (configs/dualtrack/local_stage1.py with model.causal=True and the small window), then
  loaded through `config.init_from` and frozen (`cnn_frozen`): it runs in eval mode without
  gradient and only the transformer learns, as the original trains it on its exported features.
  With `feature_cache.enabled` (the two-stage config's default) the frozen CNN's per-frame
  features of each training sweep (centre crops, exact tiling) are computed once into
  `dualtrack_jax/feature_cache.py`'s cache, under a key that hashes the CNN's weights, its
  architecture and the crop, and the transformer trains on them; without it they are recomputed
  every step. The stage-1 run must hold this model's CNN (causal, temporal kernels (3, 1, 1, 1),
  `config.model.widths`, `stem_width`), and a cached file must hold its feature width: otherwise
  a clear error names the run or the file and the cache key.
Test: whole sweeps, the CNN in exact temporal tiles (its context is causal), the transformer over
the whole sweep, the first output dropped: N - 1 motions for N frames, N <= model.max_positions.
"""
import hashlib
import json
from typing import Any

from absl import logging
import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import feature_cache
from dualtrack_jax import losses
from dualtrack_jax import tiling
from dualtrack_jax.data import sweeps
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models
from ultrasound_common import checkpoints
from ultrasound_common import errors

_CACHE_VERSION = 1  # Bump when the cached feature computation changes.


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
    rngs = {'dropout': rng}
    if feature_cache.FEATURES in batch:  # The frozen CNN's cached features (two-stage).
      pred = self.model.apply(variables, batch[feature_cache.FEATURES], train=True,
                              method='sequence', rngs=rngs)
      loss = losses.pose_mse(pred, batch['targets'])
      return loss, ({'mse': loss}, {})
    frames = baselines.normalize(batch['images'], self.config.data)
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
    features = self.frame_features(variables, images)
    return np.asarray(self._sequence(variables, features)[0], np.float64)

  def frame_features(self, variables, images: np.ndarray) -> jax.Array:
    """(1, N, widths[-1]) CNN features of (N, h, w) uint8 crops, in exact temporal tiles."""
    return tiling.tiled_temporal_apply(
        lambda x: self._features(variables, x), jnp.asarray(images[None]),
        tile=self.config.eval_tile, halo=self.model.temporal_radius)

  def _check_cnn_run(self, cnn) -> None:
    """Refuses a stage-1 run whose CNN is not this model's (architecture, causality, shapes)."""
    name = self.config.feature_cache.source
    spec = self.config.init_from[name]
    where = f'config.init_from.{name}.workdir={spec.workdir!r}'
    model = checkpoints.read_config(spec.workdir, str(spec.get('checkpoint') or 'best'))['model']
    kernels = tuple(model.get('temporal_kernels') or ())
    expected = (3,) + (1,) * (len(self.model.widths) - 1)
    if not model.get('causal') or kernels != expected:
      raise errors.InputError(
          f'{where}: its CNN (model.causal={model.get("causal")}, temporal_kernels={kernels}) is '
          f'not the hybrid transformer\'s causal small-window CNN (causal, {expected}); train it '
          'with --config.model.causal=True --config.model.temporal_kernels="(3, 1, 1, 1)"')
    template = common.subtree(jax.eval_shape(lambda: self.model.init(
        jax.random.key(0), jnp.zeros((1, 2, *self.crop), jnp.float32))), 'backbone')
    shapes = [jax.tree.map(lambda x: tuple(x.shape), t) for t in (cnn, template)]
    if shapes[0] != shapes[1]:
      raise errors.InputError(
          f'{where}: its {self.config.feature_cache.prefix!r} variables are not the shapes of '
          f'this model\'s CNN (config.model.widths={tuple(self.model.widths)}, '
          f'stem_width={self.model.stem_width})')

  def fill_feature_cache(self) -> tuple[str, str]:
    """Caches the frozen CNN's features of the training sweeps; returns (directory, key)."""
    cnn, directory = self.feature_cache_source()
    self._check_cnn_run(cnn)
    variables = {collection: {'backbone': tree} for collection, tree in cnn.items()}
    settings = dict(model='hybrid_transformer.backbone', widths=list(self.model.widths),
                    stem_width=self.model.stem_width, crop=list(self.crop),
                    pixels=[self.config.data.pixel_mean, self.config.data.pixel_std],
                    version=_CACHE_VERSION)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    feature_cache.digest_arrays(digest, 'cnn', variables)
    key = digest.hexdigest()[:16]
    cache = feature_cache.FeatureCache(directory, key)
    width, computed = self.model.widths[-1], 0
    for record in self.train_records:
      with sweeps.SweepReader(record.path) as reader:
        computed += cache.ensure(record.sweep_id, reader.num_frames, lambda r=reader: (
            self.frame_features(variables, common.center_crops(r, self.crop)[0])[0]))
      path = cache.path(record.sweep_id)
      with h5py.File(path, 'r') as f:
        shape = f[feature_cache.FEATURES].shape
      if shape[1:] != (width,):
        raise errors.InputError(
            f'{path}: cached features of shape {shape}, but this model\'s CNN gives {width} per '
            f'frame: the file is from another CNN, yet under cache key {key} of '
            f'config.feature_cache.directory={directory!r}; delete it to recompute it')
    logging.info('Feature cache %s/%s: %d sweep(s) computed, %d reused.', directory, key,
                 computed, len(self.train_records) - computed)
    return directory, key
