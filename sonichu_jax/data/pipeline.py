"""Grain pipelines over keypoint records: one-task training batches and evaluation batches.

Every batch holds images of ONE task: the task heads' BatchNorm statistics would otherwise mix
tasks (the FM_UIA baseline's MultiTaskUniformSampler does the same). Batches are dicts of
NumPy arrays with the same shapes for every task, so one compiled step can serve all of them:

| key         | shape, dtype         | meaning                                                   |
|-------------|----------------------|-----------------------------------------------------------|
| `image`     | (b, 256, 256, 3) f32 | model input (`augment.prepare`: stretch, ImageNet norm)   |
| `keypoints` | (b, 22, 2) f32       | normalised (x / W, y / H), padded to MAX_KEYPOINTS        |
| `visible`   | (b, 22) bool         | False for missing points and the padding beyond K         |
| `task`      | (b,) int32           | index in `tasks.TASK_NAMES`, equal along the batch        |
| `index`     | (b,) int32           | position of the record in `records`; -1 for padding rows  |
| `image_hw`  | (b, 2) int32         | original (H, W), to map predictions back to pixels        |
| `weight`    | (b,) f32             | 1, or 0 for the padding rows of an evaluation batch       |

Training (`train_batches`), the sampling rule: step s draws its task t with probability
proportional to n_t ** task_exponent (n_t: the task's records; 0 = uniform over tasks, as the
FM_UIA baseline; 1 = proportional to size, i.e. every image equally often). Each task consumes its
own stream of records, a fresh permutation per pass (a batch may span two passes, as the
baseline's sampler wraps around). Step s's task and rows follow from (seed, s) alone, so the
iterator state is a step count and resumes exactly, and row r of step s is augmented with the
generator seeded by (seed, s, r).

Evaluation (`eval_batches`): every record once, tasks in `TASK_NAMES` order, records in order,
each task's last batch padded with weight-0 rows (index -1) to the full size.

Multi-host contract (as `dualtrack_jax.data.pipeline`): every process computes the same schedule
and takes rows [p*b, (p+1)*b) of each global batch of B = b * shard_count rows, so all processes
see the same task at the same step and N processes read exactly the rows of one.

The step must know the task to select its head. With these uniform shapes either works:
- `lax.switch` on `batch['task'][0]` over the nine heads inside ONE jitted step (heads padded to
  22 outputs, loss masked by `visible`): no trainer change, one compilation of the backbone;
- one jitted step per task, chosen on the host with `batch_task(batch)` before the batch goes to
  the devices (keypoints sliced to K inside): nine compilations of the backbone's forward and
  backward.
"""
from collections.abc import Sequence
import dataclasses
import functools
import threading

import grain
import numpy as np

from sonichu_jax import tasks
from sonichu_jax.data import augment
from sonichu_jax.data import fmuia
from ultrasound_common import errors

MAX_KEYPOINTS = max(t.num_keypoints for t in tasks.TASKS)
# Effectively endless training streams: a MapDataset needs a length; nothing is materialised.
_ENDLESS_STEPS = 1 << 40
# Steps whose tasks are drawn together; counts per task are cached per block.
_BLOCK = 4096
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def batch_task(batch: dict) -> str:
  """The task name of a host batch; raises ValueError if its rows mix tasks."""
  ids = np.unique(np.asarray(batch['task']))
  if ids.size != 1:
    raise errors.InputError(f'batch mixes tasks {[tasks.TASK_NAMES[i] for i in ids]}')
  return tasks.TASK_NAMES[int(ids[0])]


def steps_per_epoch(records: Sequence[fmuia.KeypointRecord], batch_size: int) -> int:
  """Training steps that draw as many images as there are records (the baseline's epoch)."""
  return max(1, len(records) // batch_size)


def task_probabilities(records: Sequence[fmuia.KeypointRecord],
                       task_exponent: float) -> dict[str, float]:
  """Probability of each task (with records) being drawn for a step: n_t ** task_exponent."""
  counts = {name: 0 for name in tasks.TASK_NAMES}
  for record in records:
    counts[record.task] += 1
  weights = {name: n ** task_exponent for name, n in counts.items() if n}
  if not weights:
    raise errors.InputError('no records')
  total = sum(weights.values())
  return {name: w / total for name, w in weights.items()}


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One row of one step: which record, with which augmentation seed, and its weight."""
  record: int
  task: int
  step: int
  row: int
  real: bool


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, task: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, 1, task, epoch)).permutation(n)


@functools.lru_cache(maxsize=16)
def _block_draws(seed: int, probabilities: tuple[float, ...], block: int) -> np.ndarray:
  """The tasks (positions in `probabilities`) of the _BLOCK steps of `block`."""
  rng = np.random.default_rng((seed, 0, block))
  return rng.choice(len(probabilities), size=_BLOCK, p=probabilities)


class _TrainSlots:
  """Random-access rows of one process's training batches (see the module docstring)."""

  def __init__(self, records: Sequence[fmuia.KeypointRecord], *, batch_size: int, seed: int,
               task_exponent: float, num_steps: int, shard_index: int, shard_count: int):
    probabilities = task_probabilities(records, task_exponent)
    self._tasks = [tasks.TASK_NAMES.index(name) for name in probabilities]
    self._probs = tuple(probabilities.values())
    by_task = {t: [] for t in self._tasks}
    for i, record in enumerate(records):
      by_task[tasks.TASK_NAMES.index(record.task)].append(i)
    self._members = [np.array(by_task[t]) for t in self._tasks]
    self._seed, self._batch = seed, batch_size
    self._per_process = batch_size // shard_count
    self._first_row = shard_index * self._per_process
    self._num_steps = num_steps
    # Per block, how many earlier steps drew each task; grown on demand under the lock (Grain
    # reads with several threads).
    self._counts_before = [np.zeros(len(self._tasks), np.int64)]
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def task_and_occurrence(self, step: int) -> tuple[int, int]:
    """(position in self._tasks, how many earlier steps drew that task)."""
    block, offset = divmod(step, _BLOCK)
    with self._lock:
      while len(self._counts_before) <= block:
        done = len(self._counts_before) - 1
        self._counts_before.append(self._counts_before[-1] + np.bincount(
            _block_draws(self._seed, self._probs, done), minlength=len(self._tasks)))
      before = self._counts_before[block]
    drawn = _block_draws(self._seed, self._probs, block)
    t = int(drawn[offset])
    return t, int(before[t] + np.count_nonzero(drawn[:offset] == t))

  def __len__(self) -> int:
    return self._num_steps * self._per_process

  def __getitem__(self, index: int) -> _Slot:
    step, r = divmod(int(index), self._per_process)
    row = self._first_row + r
    t, occurrence = self.task_and_occurrence(step)
    members = self._members[t]
    epoch, position = divmod(occurrence * self._batch + row, len(members))
    record = members[_permutation(self._seed, self._tasks[t], epoch, len(members))[position]]
    return _Slot(int(record), self._tasks[t], step, row, True)


class _EvalSlots:
  """Random-access rows of one process's evaluation batches: every record once, padded per task."""

  def __init__(self, records: Sequence[fmuia.KeypointRecord], *, batch_size: int,
               shard_index: int, shard_count: int):
    self._steps = []  # (task id, record indices of the global batch, padded with -1)
    for task_id, name in enumerate(tasks.TASK_NAMES):
      members = [i for i, r in enumerate(records) if r.task == name]
      for start in range(0, len(members), batch_size):
        chunk = members[start:start + batch_size]
        self._steps.append((task_id, chunk + [-1] * (batch_size - len(chunk))))
    if not self._steps:
      raise errors.InputError('eval_batches: no records')
    self._per_process = batch_size // shard_count
    self._first_row = shard_index * self._per_process

  def __len__(self) -> int:
    return len(self._steps) * self._per_process

  def __getitem__(self, index: int) -> _Slot:
    step, r = divmod(int(index), self._per_process)
    task_id, rows = self._steps[step]
    row = self._first_row + r
    record = rows[row]
    # A padding row repeats the task's first record (any valid image of the task), with weight 0.
    return _Slot(record if record >= 0 else rows[0], task_id, step, row, record >= 0)


@dataclasses.dataclass(frozen=True)
class _Read(grain.transforms.Map):
  """Reads, augments and pads one row (`augment.prepare`)."""
  records: Sequence[fmuia.KeypointRecord]
  config: augment.AugmentConfig | None
  seed: int

  def map(self, slot: _Slot) -> dict[str, np.ndarray]:
    record = self.records[slot.record]
    rng = None if self.config is None else np.random.default_rng((self.seed, 2, slot.step,
                                                                  slot.row))
    item = augment.prepare(fmuia.read_image(record), record.keypoints, record.visible,
                           record.task, rng, self.config)
    k = len(record.keypoints)
    keypoints = np.zeros((MAX_KEYPOINTS, 2), np.float32)
    visible = np.zeros(MAX_KEYPOINTS, bool)
    keypoints[:k], visible[:k] = item['keypoints'], item['visible']
    return dict(image=item['image'], keypoints=keypoints, visible=visible,
                task=np.int32(slot.task), index=np.int32(slot.record if slot.real else -1),
                image_hw=np.array(record.image_hw, np.int32),
                weight=np.float32(1.0 if slot.real else 0.0))


def _per_process_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
  if not 0 <= shard_index < shard_count:
    raise errors.InputError(f'shard_index {shard_index} outside [0, shard_count={shard_count})')
  if batch_size <= 0 or batch_size % shard_count:
    raise errors.InputError(
        f'The global batch size {batch_size} must be a positive multiple of the '
        f'number of processes {shard_count}.')
  return batch_size // shard_count


def train_batches(records: Sequence[fmuia.KeypointRecord], *, batch_size: int, seed: int,
                  augment_config: augment.AugmentConfig | None = augment.AugmentConfig(),
                  task_exponent: float = 0.0, num_steps: int | None = None,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Endless (or `num_steps`) one-task training batches; see the module docstring.

  Args:
    records: the training records (`fmuia.load_split`).
    batch_size: GLOBAL batch size B; each process gets B // shard_count rows.
    seed: schedule, permutations and augmentation seed.
    augment_config: augmentation ranges, None for none.
    task_exponent: task sampling weights n_t ** task_exponent (0: uniform over tasks).
    num_steps: number of batches, None for endless.
    shard_index, shard_count: this process and the number of processes.
  """
  b = _per_process_batch(batch_size, shard_index, shard_count)
  slots = _TrainSlots(records, batch_size=batch_size, seed=seed, task_exponent=task_exponent,
                      num_steps=_ENDLESS_STEPS if num_steps is None else num_steps,
                      shard_index=shard_index, shard_count=shard_count)
  ds = grain.MapDataset.source(slots).map(_Read(tuple(records), augment_config, seed))
  return ds.batch(b, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)


def eval_batches(records: Sequence[fmuia.KeypointRecord], *, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Every record once in one-task batches, no augmentation; see the module docstring."""
  b = _per_process_batch(batch_size, shard_index, shard_count)
  slots = _EvalSlots(records, batch_size=batch_size, shard_index=shard_index,
                     shard_count=shard_count)
  ds = grain.MapDataset.source(slots).map(_Read(tuple(records), None, 0))
  return ds.batch(b, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)
