"""Ensembles of SONICHU keypoint models: K members of one architecture as one vmapped program.

The card's teachers (stage 2) are combined by the coordinate-wise median of their predictions: a
separate median for each x and each y over the members (docs/teachers.md). Here the members'
variables are stacked on a leading axis and `jax.vmap` runs them over one image batch, one
compiled program instead of K (training_and_export_notes.md, section 3.3), inference mode only
(BatchNorm running statistics, no stochastic depth).

    members = ensemble.load_members(['runs/r1', 'runs/r2', 'runs/r3'], dtype='bfloat16')
    preds = ensemble.member_predictions(members.experiment, members.variables, images, task_index)
    target = ensemble.median(preds)            # (B, 22, 2) normalised
    confidence = ensemble.spread(preds, wh)    # (B, 22) pixels

`member_predictions` is a pure function of arrays, so it also runs inside another jitted function
(the distillation loss runs the teachers on the student's augmented batch). `evaluate_records`
scores every member and the median on validation records (`launch.evaluate --ensemble`);
`predict_records` gives the raw member predictions of any records (pseudo-labelling). `benchmark`
(`launch.benchmark --bench=ensemble`) times the vmapped program against the members one by one.

A member is a run folder (its best checkpoint, else its latest), or a step directory
(`RUN/best/900`, `RUN/checkpoints/1200`). All members must have the same `config.model` (but for
`FREE_MODEL_KEYS`: stochastic depth and kernel choices), the same task set (`config.data.tasks`,
empty meaning all nine) and equal variable shapes; the error names the file and the config key
that differs.
"""
from collections.abc import Sequence
import dataclasses
import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sonichu_jax import benchmarks
from sonichu_jax import metrics
from sonichu_jax import tasks
from sonichu_jax.data import fmuia
from sonichu_jax.data import pipeline
from sonichu_jax.experiments import keypoints
from ultrasound_common import checkpoints
from ultrasound_common import errors

MAX_KEYPOINTS = keypoints.MAX_KEYPOINTS
MEDIAN = 'median'
# config.model keys in which members may differ: stochastic depth (off in inference) and the
# kernel choices that compute the same function (the first member's are used for all).
FREE_MODEL_KEYS = frozenset({'drop_path_rate', 'attention_implementation',
                             'deconv_implementation'})


class MemberError(errors.InputError):
  """A member checkpoint is missing or does not match the others."""


@dataclasses.dataclass(frozen=True)
class Members:
  """K loaded members.

  Attributes:
    variables: every member's variables stacked on a leading axis of size K (on device).
    config: the first member's config (the architecture and task set all members share), with
      `compute_dtype` set to the dtype the members compute in.
    experiment: a keypoint experiment of `config` (no data loaded) whose `padded_keypoints` runs
      one member; pass it to `member_predictions`.
    paths: each member's checkpoint step directory.
    hashes: each member's SHA-256 of its variables as stored (names, dtypes, shapes, bytes), to
      record which teachers a run used.
  """
  variables: Any
  config: ml_collections.ConfigDict
  experiment: keypoints.Experiment
  paths: tuple[str, ...]
  hashes: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.paths)


def variables_hash(variables) -> str:
  """SHA-256 hex digest of a variables tree: every leaf's name, dtype, shape and bytes."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def task_set(config: ml_collections.ConfigDict | dict) -> tuple[str, ...]:
  """The tasks a run was trained on: `config.data.tasks`, or all nine when empty."""
  names = (config.get('data') or {}).get('tasks') or tasks.TASK_NAMES
  return tuple(sorted(tasks.get_task(t).name for t in names))


def _step_dir(path: str, checkpoint: str) -> str:
  if not os.path.exists(os.path.expanduser(path)):
    raise MemberError(f'{path}: no such run folder or checkpoint directory')
  try:
    directory, step = checkpoints.find_step(path, checkpoint)
  except errors.MissingFileError as e:
    raise MemberError(str(e)) from e
  return os.path.join(directory, str(step))


def _check_same(first: str, first_config: dict, path: str, config: dict) -> None:
  """MemberError naming `path` and the first differing key of `config.model` or the task set."""
  if 'model' not in config:
    raise MemberError(f'{path}: config has no key "model"; not a SONICHU keypoint run '
                      f'(config.experiment {config.get("experiment")!r})')
  for key in sorted((set(first_config['model']) | set(config['model'])) - FREE_MODEL_KEYS):
    a, b = first_config['model'].get(key), config['model'].get(key)
    if a != b:
      raise MemberError(f'{path}: config.model.{key} is {b!r}, but {a!r} in {first}; ensemble '
                        'members must share one architecture')
  if task_set(config) != task_set(first_config):
    raise MemberError(f'{path}: config.data.tasks is {list(task_set(config))}, but '
                      f'{list(task_set(first_config))} in {first}; ensemble members must share '
                      'one task set')


def _check_shapes(first: str, reference, path: str, variables) -> None:
  shapes = {jax.tree_util.keystr(p): (np.shape(x), np.asarray(x).dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  wanted = {jax.tree_util.keystr(p): (np.shape(x), np.asarray(x).dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(reference)[0]}
  for name in sorted(set(shapes) | set(wanted)):
    if shapes.get(name) != wanted.get(name):
      raise MemberError(f'{path}: variable {name} is {shapes.get(name)}, but {wanted.get(name)} '
                        f'in {first}')


def load_members(paths: Sequence[str], checkpoint: str = 'best',
                 dtype: str | None = None) -> Members:
  """Loads and checks K >= 1 members (module docstring) and stacks their variables.

  Args:
    paths: run folders or checkpoint step directories.
    checkpoint: for run folders, 'best' (else the latest), 'latest', or a step number.
    dtype: the members' compute dtype ('bfloat16' for cheap teachers); their floating-point
      variables are then stored in it as well (half the memory in bf16). None: each run's own
      `compute_dtype` and float32 variables.

  Raises:
    MemberError: no paths, a missing checkpoint, or a member unlike the first (config.model key,
      task set, or variable shapes).
  """
  if not paths:
    raise MemberError('an ensemble needs at least one member checkpoint')
  step_dirs = [_step_dir(p, checkpoint) for p in paths]
  configs = [checkpoints.read_config(d) for d in step_dirs]  # Checked before any weights load.
  for step_dir, config in zip(step_dirs, configs):
    _check_same(step_dirs[0], configs[0], step_dir, config)
  loaded = []
  for step_dir in step_dirs:
    variables = jax.device_get(checkpoints.read_variables(step_dir))
    if loaded:
      _check_shapes(step_dirs[0], loaded[0], step_dir, variables)
    loaded.append(variables)
  hashes = tuple(variables_hash(v) for v in loaded)
  stacked = jax.tree.map(lambda *x: np.stack(x), *loaded)
  config = ml_collections.ConfigDict(configs[0])
  if dtype is not None:
    config.compute_dtype = str(jnp.dtype(dtype))
    stacked = jax.tree.map(
        lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, stacked)
  return Members(variables=jax.device_put(stacked), config=config,
                 experiment=keypoints.Experiment(config, load_data=False),
                 paths=tuple(step_dirs), hashes=hashes)


def member_predictions(experiment: keypoints.Experiment, stacked_variables, images: jax.Array,
                       task_index: jax.Array, *, tta: bool = False,
                       sequential: bool = False) -> jax.Array:
  """Every member's keypoints for one task's batch: (K, B, MAX_KEYPOINTS, 2) float32.

  Traceable (use it inside a jitted function); `jit_member_predictions` is the compiled form.

  Args:
    experiment: a keypoint experiment of the members' architecture (`Members.experiment`); its
      model's dtype is the compute dtype.
    stacked_variables: member variables stacked on axis 0 (`Members.variables`).
    images: (B, 256, 256, 3) preprocessed images of one task.
    task_index: index of the task in `tasks.TASK_NAMES` (traced or static, not per member).
    tta: average each member's prediction with its flipped image's (the card's TTA).
    sequential: `lax.map` over the members (one program that runs them in turn, holding one
      member's activations at a time) instead of `vmap` (all at once). vmap turns the members'
      convolutions into grouped ones, which XLA:CPU runs slowly (`benchmark`).

  Returns:
    Normalised (x, y) per member, zero beyond the task's K keypoints.
  """
  run = lambda v: experiment.padded_keypoints(v, images, task_index, tta=tta)
  preds = jax.lax.map(run, stacked_variables) if sequential else jax.vmap(run)(stacked_variables)
  return preds.astype(jnp.float32)


def jit_member_predictions(experiment: keypoints.Experiment, *, tta: bool = False,
                           sequential: bool = False):
  """`member_predictions` compiled: (stacked_variables, images, task_index) -> (K, B, 22, 2)."""
  return jax.jit(lambda v, images, task_index: member_predictions(
      experiment, v, images, task_index, tta=tta, sequential=sequential))


def median(preds: jax.Array) -> jax.Array:
  """Coordinate-wise median over members: (K, ..., 2) -> (..., 2).

  Each x and each y separately (the card's rule); with an even K the mean of the middle two.
  """
  return jnp.median(preds, axis=0)


def spread(preds: jax.Array, image_wh: jax.Array | None = None) -> jax.Array:
  """Members' disagreement per keypoint: the mean Euclidean distance to the median.

  Args:
    preds: (K, B, N, 2) normalised member predictions.
    image_wh: optional (B, 2) original (W, H): the distances are then in original pixels, the
      unit of the MRE; else in normalised units (x and y scaled by the image's own W and H).

  Returns:
    (B, N); 0 for a single member.
  """
  diff = preds - median(preds)[None]
  if image_wh is not None:
    diff = diff * jnp.asarray(image_wh, diff.dtype)[None, :, None, :]
  return jnp.mean(jnp.linalg.norm(diff, axis=-1), axis=0)


def predict_records(members: Members, records: Sequence[fmuia.KeypointRecord], *,
                    batch_size: int, tta: bool) -> dict[str, tuple[np.ndarray, list]]:
  """Every member's keypoints, in original pixels, of every record (no augmentation).

  Returns:
    {task: ((K, n_t, K_t, 2) predictions in pixels, the task's n_t records in that order)}.
  """
  predict = jit_member_predictions(members.experiment, tta=tta)
  pred, index = {}, {}
  for batch in pipeline.eval_batches(records, batch_size=batch_size):
    task = pipeline.batch_task(batch)
    real = batch['weight'] > 0
    coords = np.asarray(predict(members.variables, batch['image'],
                                tasks.TASK_NAMES.index(task)), np.float64)
    k = tasks.get_task(task).num_keypoints
    wh = batch['image_hw'][real][:, ::-1].astype(np.float64)
    pred.setdefault(task, []).append(coords[:, real, :k] * wh[None, :, None, :])
    index.setdefault(task, []).append(batch['index'][real])
  return {t: (np.concatenate(pred[t], axis=1), [records[i] for i in np.concatenate(index[t])])
          for t in pred}


def evaluate_records(members: Members, records: Sequence[fmuia.KeypointRecord], *,
                     batch_size: int, tta: bool) -> tuple[list[dict[str, float]],
                                                          dict[str, float]]:
  """(each member's metrics, the coordinate-wise median's), `sonichu_jax.metrics.evaluate`.

  The members run as one vmapped program per batch; the median is taken in original pixels
  (the same as in normalised coordinates: the scale is per image and positive).
  """
  predicted = predict_records(members, records, batch_size=batch_size, tta=tta)
  target = {t: np.stack([r.keypoints for r in rs]) for t, (_, rs) in predicted.items()}
  visible = {t: np.stack([r.visible for r in rs]) for t, (_, rs) in predicted.items()}
  per_member = [metrics.evaluate({t: p[k] for t, (p, _) in predicted.items()}, target, visible)
                for k in range(members.size)]
  combined = metrics.evaluate({t: np.median(p, axis=0) for t, (p, _) in predicted.items()},
                              target, visible)
  return per_member, combined


# `benchmark` sizes: keypoints.py:sim's model (CPU) and SONICHU-124M (accelerators only).
BENCHMARK_MODELS = {
    'sim': dict(patch_size=32, embed_dim=64, depth=4, num_heads=4, head_filters=32),
    'sonichu_124m': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, head_filters=256),
}


def _timed(fn, steps: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `steps` warm calls) in seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def benchmark(steps: int, num_members: int = 5, batch_size: int = 8) -> None:
  """Prints the time of one ensemble prediction (flip TTA, task HC, float32) of `num_members`
  members on `batch_size` images: one vmapped program, one `lax.map` program (`sequential`), and
  the members one by one (the same jitted single-model program called per member, as evaluating
  each run in turn does)."""
  sizes = ['sim'] + (['sonichu_124m'] if jax.default_backend() != 'cpu' else [])
  images = np.random.default_rng(0).normal(size=(batch_size, 256, 256, 3)).astype(np.float32)
  task_index = tasks.TASK_NAMES.index('HC')
  for size in sizes:
    config = ml_collections.ConfigDict(dict(
        loss='l1', compute_dtype='float32',
        model=dict(BENCHMARK_MODELS[size], mlp_ratio=4.0, drop_path_rate=0.0, temperature=1.0)))
    experiment = keypoints.Experiment(config, load_data=False)
    members = [jax.device_put(benchmarks.random_variables(experiment.model, seed))
               for seed in range(num_members)]
    stacked = jax.device_put(jax.tree.map(lambda *x: jnp.stack(x), *members))
    single = jax.jit(experiment.padded_keypoints, static_argnames=('tta',))
    results = {}
    for name, fn in (('vmap', jit_member_predictions(experiment, tta=True)),
                     ('lax.map', jit_member_predictions(experiment, tta=True, sequential=True))):
      results[name] = _timed(lambda: fn(stacked, images, task_index), steps)
    results['one by one'] = _timed(
        lambda: [single(v, images, task_index, tta=True) for v in members], steps)
    base = results['one by one'][1]
    print(f'ensemble {size} ({jax.devices()[0].device_kind}), {num_members} members, batch '
          f'{batch_size}, flip TTA, median of {steps}: ' + ', '.join(
              f'{name} {t * 1e3:.1f} ms (x{base / t:.2f} of one by one; first call {first:.1f} s)'
              for name, (first, t) in results.items()))
