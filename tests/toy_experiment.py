"""A tiny third model package (Conv + BatchNorm + Dropout + Dense regression) for the runtime.

It is at once the experiment module (`config.experiment = 'toy_experiment'`, importable with
tests/ on PYTHONPATH), its config file (`--config=tests/toy_experiment.py`) and its package's
interface (launch/models.py), registered as `toy` by tests/toy_experiment-0.0.dist-info (what pip
would write for an installed package): train, evaluate, predict, export and benchmark reach it
without a line of launch/ naming it. The data are generated deterministically in a Grain
pipeline (range -> shuffle -> repeat -> random_map -> batch -> shard): random 8x8 images, and as
targets the spatial means of a ReLU'd 3x3 "teacher" convolution read from `config.data_file` (an
.npz with 'kernel' (3, 3, 1, 3)), which the model can learn. It never imports `launch`.
"""
import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np

from ultrasound_common import errors


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
      num_train=64, image_size=8, num_val_sweeps=2, val_sweep_length=6, features=8,
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
  features: int = 8

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (3, 3), use_bias=False)(x)  # a bias before BatchNorm has no gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(3)(x)


@dataclasses.dataclass
class ToyEvalResult:
  metrics: dict
  figures: dict


class Experiment:
  """The runtime's experiment protocol for the toy regression."""

  def __init__(self, config, *, load_data: bool = True):
    self.config = config
    self.model = ToyModel(config.toy.features)
    self._predict = jax.jit(lambda variables, x: self.model.apply(variables, x, train=False))
    if not load_data:
      return
    path = config.data_file
    if not path or not os.path.isfile(path):
      raise errors.MissingFileError(
          f'{path or "(empty)"}: toy data file not found (config.data_file)')
    with np.load(path) as data:
      if 'kernel' not in data:
        raise errors.InputError(f"{path}: key 'kernel' missing (config.data_file)")
      self.kernel = data['kernel']
    size = config.toy.image_size
    rng = np.random.default_rng(1234)
    shape = (config.toy.num_val_sweeps, config.toy.val_sweep_length, size, size, 1)
    self.val_images = rng.standard_normal(shape).astype(np.float32)
    self.val_targets = teacher_targets(self.val_images, self.kernel)

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
    mse = float(np.mean(np.square(pred - self.val_targets)))
    figures = {f'errors/toy_{i}': _error_picture(pred[i] - self.val_targets[i]) for i in range(n)}
    return ToyEvalResult(metrics={'mse': mse, 'rmse': mse ** 0.5}, figures=figures)

  def predict(self, variables, images: np.ndarray) -> np.ndarray:
    """(B, 8, 8, 1) float32 images -> (B, 3) predictions."""
    return np.asarray(self._predict(variables, images))

  def export_spec(self, variables, options):
    """`launch.export`'s protocol: the eval-mode model on a symbolic batch; no options."""
    del options
    size = self.config.toy.image_size
    return dict(
        fn=lambda variables, images: {'targets': self.model.apply(variables, images,
                                                                  train=False)},
        variables=variables,
        inputs=[dict(name='images', shape=('b', size, size, 1), dtype='float32',
                     description=f'b standard-normal {size}x{size} images')],
        outputs={'targets': '(b, 3) the predicted teacher means'},
        metadata={'model': 'toy regression of tests/toy_experiment.py'})


def _error_picture(errors: np.ndarray) -> np.ndarray:
  """(T, 3) errors as a (T * 8, 24, 3) uint8 picture: gray 128 is zero, one 8x8 cell each."""
  cells = np.clip(128 + 64 * errors, 0, 255).astype(np.uint8)
  return np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[..., None].repeat(3, axis=-1)


# The package interface (launch/models.py).
PREDICTION_LAYOUT = 'folders'


def plan_predictions(run, inputs, flag_values):
  """One folder per .npy input of (8, 8) images: prediction.json with the model's 3 outputs."""
  del flag_values
  if not inputs:
    raise errors.InputError('toy: give .npy files of (8, 8) images as arguments')
  images = {}
  for path in inputs:
    if not os.path.isfile(path):
      raise errors.MissingFileError(f'{path}: file does not exist')
    image = np.load(path)
    if image.shape != (8, 8):
      raise errors.InputError(f'{path}: expected an (8, 8) image, got shape {image.shape}')
    images[path] = image.astype(np.float32)

  def writer(path):
    def write(folder, name):
      del name
      (pred,) = run.experiment.predict(run.variables, images[path][None, ..., None])
      with open(os.path.join(folder, 'prediction.json'), 'w') as f:
        json.dump({'input': path, 'prediction': pred.tolist(), 'step': run.step}, f)
      return f'{path}: {pred.round(4).tolist()}', {'output_mean': float(pred.mean())}
    return write

  return [(os.path.splitext(os.path.basename(p))[0], writer(p)) for p in images]


def benchmark_cases(options):
  """One case per batch size: the toy model's inference on random images, per dtype."""
  model = ToyModel()
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             np.zeros((1, 8, 8, 1), np.float32))
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), variables)
  rng = np.random.default_rng(options.seed)
  for batch in options.sizes:
    yield dict(label=f'toy, batch {batch}', items=batch, item_name='images',
               inputs=(rng.standard_normal((batch, 8, 8, 1)).astype(np.float32),),
               variants=tuple(dict(dtype=d, fn=functools.partial(_apply, jnp.dtype(d)),
                                   variables=variables) for d in options.dtypes))


def _apply(dtype, variables, images):
  cast = jax.tree.map(lambda x: x.astype(dtype), (variables, images))
  return ToyModel().apply(*cast, train=False)


def _failing_cases(options):
  raise errors.InputError(f'toy: no such weights for batch {options.sizes[0]}')


def _hanging_cases(options):
  del options
  time.sleep(600)
  yield {}


def suite_cases(scale):
  """A suite whose cases end in each status: ok (with torch skipped), failed, timeout."""
  del scale
  common = dict(kind='inference', timeout_s=60, options=dict(sizes=(2,)))
  return [dict(name='toy/ok', cases=benchmark_cases, jax_dtypes=('float32', 'bfloat16'),
               original='{Toy}', torch_compile_dtypes=('bfloat16',), **common),
          dict(name='toy/fails', cases=_failing_cases, **common),
          dict(name='toy/hangs', cases=_hanging_cases, tiny_timeout_s=10, **common)]


INFERENCE_BENCHMARKS = {'toy': benchmark_cases}
BENCHMARK_SUITES = {'toy': suite_cases}
