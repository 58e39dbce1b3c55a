"""A tiny experiment (Conv + BatchNorm + Dropout + Dense regression) that exercises the runtime.

It is both the experiment module (`config.experiment = 'toy_experiment'`, importable with tests/ on
PYTHONPATH) and its config file (`--config=tests/toy_experiment.py`). The data are generated
deterministically in a Grain pipeline (range -> shuffle -> repeat -> random_map -> batch -> shard):
random 8x8 images, and as targets the spatial means of a ReLU'd 3x3 "teacher" convolution read
from `config.data_file` (an .npz with 'kernel' (3, 3, 1, 3)), which the model can learn. It
follows the runtime's protocol without importing `launch`.
"""
import dataclasses
import os
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np


def get_config(arg=None):
  """Toy run: 6 epochs of 4 steps at batch 16; checkpoints every 8 steps, eval every 12."""
  del arg
  config = ml_collections.ConfigDict()
  config.experiment = 'toy_experiment'
  config.data_file = ''
  config.seed = 0
  config.batch_size = 16
  config.num_epochs = 6
  config.total_steps = config_dict.placeholder(int)
  config.warmup_epochs = 1
  config.log_every_steps = 4
  config.checkpoint_every_steps = 8
  config.eval_every_steps = 12
  config.keep_checkpoints = 2
  config.best_metric = 'mse'
  config.best_mode = 'min'
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-2, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=config_dict.placeholder(float), schedule='warmup_cosine'))
  config.frozen = ()
  config.fsdp = False
  config.fsdp_min_size_mb = 4.0
  config.num_workers = 0
  config.toy = ml_collections.ConfigDict(dict(
      num_train=64, image_size=8, num_val_sweeps=2, val_sweep_length=6,
      nan_from_step=-1,  # >= 0: targets become NaN from this global batch on
      sleep_per_batch=0.0))  # seconds; slows a run down for the kill tests
  return config


def write_teacher(path: str, seed: int = 0) -> str:
  """Writes the toy data file (the teacher kernel) and returns its path."""
  kernel = np.random.default_rng(seed).standard_normal((3, 3, 1, 3)).astype(np.float32)
  np.savez(path, kernel=kernel)
  return path


def teacher_targets(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Spatial mean of relu(conv3x3(images, kernel)) with zero padding; images (..., H, W, 1)."""
  h, w = images.shape[-3:-1]
  padded = np.pad(images[..., 0], [(0, 0)] * (images.ndim - 3) + [(1, 1), (1, 1)])
  out = sum(padded[..., i:i + h, j:j + w, None] * kernel[i, j, 0]
            for i in range(3) for j in range(3))
  return np.maximum(out, 0).mean(axis=(-3, -2)).astype(np.float32)


class ToyModel(nn.Module):
  """Conv (no bias) -> BatchNorm -> ReLU -> spatial mean -> Dropout -> Dense(3)."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)  # a bias before BatchNorm has no gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(3)(x)


@dataclasses.dataclass
class ToyEvalResult:
  metrics: dict
  sweeps: list


class Experiment:
  """The runtime's experiment protocol for the toy regression."""

  def __init__(self, config):
    self.config = config
    path = config.data_file
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(f'{path or "(empty)"}: toy data file not found (config.data_file)')
    with np.load(path) as data:
      if 'kernel' not in data:
        raise KeyError(f"{path}: key 'kernel' missing (config.data_file)")
      self.kernel = data['kernel']
    self.model = ToyModel()
    size = config.toy.image_size
    rng = np.random.default_rng(1234)
    shape = (config.toy.num_val_sweeps, config.toy.val_sweep_length, size, size, 1)
    self.val_images = rng.standard_normal(shape).astype(np.float32)
    self.val_targets = teacher_targets(self.val_images, self.kernel)
    self._predict = jax.jit(lambda variables, x: self.model.apply(variables, x, train=False))

  @property
  def steps_per_epoch(self) -> int:
    return self.config.toy.num_train // self.config.batch_size

  def _example(self, index, rng: np.random.Generator):
    del index  # the per-element rng already depends on it
    size = self.config.toy.image_size
    image = rng.standard_normal((size, size, 1)).astype(np.float32)
    return {'image': image, 'target': teacher_targets(image, self.kernel)}

  def _poison(self, position, example):
    # `position` is the place in the global stream, so batch = position // batch_size.
    if 0 <= self.config.toy.nan_from_step <= position // self.config.batch_size:
      example = {**example, 'target': np.full_like(example['target'], np.nan)}
    return example

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    sleep = self.config.toy.sleep_per_batch
    ds = (grain.MapDataset.range(self.config.toy.num_train)
          .shuffle(seed=seed)
          .repeat()
          .random_map(self._example, seed=seed)
          .map_with_index(self._poison))
    # Batch by the per-process size, then give process p every shard_count-th of these blocks:
    # process p's batch j is rows [p*b, (p+1)*b) of the single-process batch j, so the global
    # batch (processes concatenated in order) is row-for-row the single-process one.
    ds = ds.batch(self.config.batch_size // shard_count,
                  drop_remainder=True)[shard_index::shard_count]
    if sleep:
      ds = ds.map(lambda batch: (time.sleep(sleep), batch)[1])
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))

  def init(self, rng, batch):
    return self.model.init({'params': rng, 'dropout': rng}, batch['image'], train=False)

  def loss_fn(self, variables, batch, rng):
    pred, updates = self.model.apply(variables, batch['image'], train=True,
                                     rngs={'dropout': rng}, mutable=['batch_stats'])
    loss = jnp.mean(jnp.square(pred - batch['target']))
    return loss, ({'pred_abs': jnp.mean(jnp.abs(pred))}, updates)

  def evaluate(self, variables):
    n, t = self.val_images.shape[:2]
    images = self.val_images.reshape((n * t,) + self.val_images.shape[2:])
    pred = np.asarray(self._predict(variables, images)).reshape(n, t, 3)
    sweeps = []
    for i in range(n):
      sweeps.append({'sweep_id': f'toy/{i}', 'pred_global': _trajectory(pred[i]),
                     'gt_global': _trajectory(self.val_targets[i])})
    mse = float(np.mean(np.square(pred - self.val_targets)))
    return ToyEvalResult(metrics={'mse': mse, 'rmse': mse ** 0.5}, sweeps=sweeps)


def _trajectory(steps: np.ndarray) -> np.ndarray:
  """(T, 3) per-frame displacements -> (T, 4, 4) translations, starting at the identity."""
  g = np.tile(np.eye(4), (len(steps), 1, 1))
  g[1:, :3, 3] = np.cumsum(steps[1:], axis=0)
  return g
