"""Orbax checkpoints of a run: the last K training states plus the best evaluated variables.

Layout under the workdir:
  checkpoints/<step>/{state, data, config}   the last `keep` training checkpoints: the whole
                                              train state, every process's Grain iterator state
                                              and the config (JSON). Resume reads the newest.
  best/<step>/{state, config, metrics}        the variables ({'variables': ...}, no optimiser
                                              state) with the best `best_metric` so far.

Why two managers: Orbax's single-manager `best_fn` keeps the top-K *by metric*, and steps saved
without an evaluation would either be dropped or need fake metrics. A separate `best/` manager
keeps "last K" and "best" independent, is written only when the metric improves, and holds only
what evaluation and export need (a third of a training checkpoint with Adam).

Saves are asynchronous (device-to-host copy blocks, the file writes run in the background);
`wait_until_finished` before exit. Orbax writes into `<step>.orbax-checkpoint-tmp` and renames on
completion, so a process killed mid-save leaves the previous checkpoints intact and the partial one
is never read back.
"""
from collections.abc import Mapping
import math
import os
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from launch import config_utils
from ultrasound_common import checkpoints
from ultrasound_common import errors

STATE, CONFIG = checkpoints.STATE, checkpoints.CONFIG
DATA = 'data'
LATEST_DIR, BEST_DIR = 'checkpoints', 'best'


def is_better(value: float, best: float | None, mode: str) -> bool:
  """Whether `value` improves on `best` (None = nothing yet) under mode 'min' or 'max'."""
  if mode not in ('min', 'max'):
    raise config_utils.ConfigError(f"config.best_mode must be 'min' or 'max', got {mode!r}")
  if not math.isfinite(value):
    return False
  return best is None or (value < best if mode == 'min' else value > best)


def _item_handlers() -> dict[str, Any]:
  # The PyTree handler (what StandardSave wraps) for 'state', so that `restore_variables` can
  # read the 'variables' subtree alone (partial restore) without the optimiser state.
  return {STATE: ocp.PyTreeCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
          CONFIG: ocp.JsonCheckpointHandler()}


def _manager(directory: str, *, max_to_keep: int | None, create: bool, best_metric=None,
             best_mode='min') -> ocp.CheckpointManager:
  # The managers of checkpoints/ and best/ save at the same time (the async finalisation of one
  # overlaps the next save of the other), and orbax names its cross-process barriers by a fixed
  # key: without a prefix of their own, two processes can meet at one barrier from two managers
  # ("Barrier ... is already ongoing", or a hang).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create, read_only=not create,
      best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory))))
  return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'/'-joined path: (shape, dtype name)} of a tree of arrays or array metadata."""
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in _leaves(tree).items()}


def check_same_model(saved, wanted, where: str, config_changes: list[str]) -> None:
  """Refuses a checkpoint whose variables' shapes differ from the model's, before restoring.

  Args:
    saved: the checkpoint's variables metadata (shapes and dtypes).
    wanted: the model's abstract variables.
    where: the checkpoint folder, for the message.
    config_changes: `config_utils.diff` lines between the saved config and this run's.
  """
  saved, wanted = _shapes(saved), _shapes(wanted)
  differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
  if not differ:
    return
  shown = ', '.join(f'{k} {saved.get(k, ("absent",))[0]} -> {wanted.get(k, ("absent",))[0]}'
                    for k in differ[:5])
  keys = '; '.join(config_changes[:5]) or 'none'
  raise checkpoints.CheckpointError(
      f'{where}: the checkpoint holds another model ({len(differ)} variables differ: {shown}); '
      f'config keys that changed since it was saved: {keys}. Resume with the saved config, or '
      'start a new run in another --workdir')


class RunCheckpoints:
  """Training checkpoints (`checkpoints/`) and best variables (`best/`) of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = 'min'):
    is_better(0.0, None, best_mode)  # validates best_mode before anything is written
    self.workdir = os.path.abspath(workdir)
    self.best_metric, self.best_mode = best_metric, best_mode
    self.latest = _manager(os.path.join(self.workdir, LATEST_DIR), max_to_keep=keep, create=True)
    self.best = None
    self._best_value = None
    if best_metric:
      self.best = _manager(os.path.join(self.workdir, BEST_DIR), max_to_keep=1, create=True,
                           best_metric=best_metric, best_mode=best_mode)
      step = self.best.best_step()
      if step is not None:
        self._best_value = float(self.best.metrics(step)[best_metric])

  # Training checkpoints -------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.latest.directory, str(step))

  def resume(self, abstract_state, data_iterator, config: Mapping[str, Any]):
    """Restores the newest readable training checkpoint; (step, state), or (None, None).

    A checkpoint that cannot be read (truncated, damaged) is moved aside to
    `<step>.damaged-<n>` with a warning naming it, and the previous one is tried: a crash that
    damaged the newest checkpoint costs the steps since the one before, not the run. A checkpoint
    of another model (different variable shapes) is refused before anything is restored.

    Args:
      abstract_state: as for `restore`.
      data_iterator: as for `restore`.
      config: this run's config (JSON dict), to name the keys that changed.
    """
    for step in sorted(self.latest.all_steps(), reverse=True):
      where = self.step_dir(step)
      try:
        saved_config = self.config(step)
        metadata = self.latest.item_metadata(step)[STATE]
      except checkpoints.DAMAGE as e:
        self._move_aside(step, e)
        continue
      changes = config_utils.diff(saved_config, config)
      check_same_model(metadata['variables'], abstract_state['variables'], where, changes)
      if changes:
        logging.warning('The config differs from the one saved at step %d:\n  %s', step,
                        '\n  '.join(changes))
      try:
        return step, self.restore(step, abstract_state, data_iterator)
      except errors.Error:
        raise
      except checkpoints.DAMAGE as e:
        self._move_aside(step, e)
    return None, None

  def _move_aside(self, step: int, error: Exception) -> None:
    where = self.step_dir(step)
    aside = f'{where}.damaged'
    n = 0
    while os.path.exists(f'{aside}-{n}'):
      n += 1
    if jax.process_index() == 0:
      os.rename(where, f'{aside}-{n}')
    multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self.latest.reload()
    logging.warning('Checkpoint %s cannot be read (%s: %s); moved it to %s-%d and trying the '
                    'previous one.', where, type(error).__name__, str(error).split('\n')[0][:200],
                    aside, n)

  def save(self, step: int, state, data_iterator, config: Mapping[str, Any]) -> None:
    """Starts an async save of the train state, the data iterator position and the config."""
    self.latest.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(state),
        DATA: grain.checkpoint.CheckpointSave(data_iterator),
        CONFIG: ocp.args.JsonSave(dict(config))}))

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores the train state with the shardings of `abstract_state` and the iterator in place.

    Args:
      step: a step of `checkpoints/`.
      abstract_state: tree of jax.ShapeDtypeStruct with `.sharding` set (the target layout, which
        may differ from the one that was saved, e.g. another device count).
      data_iterator: the freshly created Grain iterator; its position is set from the checkpoint.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    try:
      restored = self.latest.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
          DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
    except ValueError as e:
      data_dir = os.path.join(self.latest.directory, str(step), DATA)
      if 'does not exist' in str(e) and os.path.isdir(data_dir):
        raise errors.InputError(
            f'{data_dir}: no data-iterator state for process {jax.process_index()} of '
            f'{jax.process_count()} (found {sorted(os.listdir(data_dir))}); resume with the same '
            'number of processes') from e
      raise
    return restored[STATE]

  def config(self, step: int) -> dict[str, Any]:
    """The config (JSON dict) saved with a training checkpoint."""
    return _restore_config(self.latest, step)

  # Best variables -------------------------------------------------------------------------------

  def best_step(self) -> int | None:
    return self.best.best_step() if self.best is not None else None

  def best_value(self) -> float | None:
    """The best `best_metric` value saved so far (None before the first evaluation)."""
    # Kept in memory: the metrics of an async save in progress are not on disk yet.
    return self._best_value

  def maybe_save_best(self, step: int, variables, metrics: Mapping[str, float],
                      config: Mapping[str, Any]) -> bool:
    """Saves the variables under best/ if metrics[best_metric] improved; returns whether it did."""
    if self.best is None:
      return False
    if self.best_metric not in metrics:
      raise KeyError(f"config.best_metric '{self.best_metric}' is not among the evaluation "
                     f'metrics {sorted(metrics)}')
    value = float(metrics[self.best_metric])
    improved = is_better(value, self._best_value, self.best_mode)
    if jax.process_count() > 1:
      # Every process must take the same decision (the save is collective), even if their
      # metric values differ in the last bit: process 0 decides.
      improved = bool(multihost_utils.broadcast_one_to_all(np.int32(improved)))
    if not improved:
      return False
    self._best_value = value
    self.best.save(step, metrics={k: float(v) for k, v in metrics.items()},
                   args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave({'variables': variables}),
                                              CONFIG: ocp.args.JsonSave(dict(config))}))
    logging.info('New best %s = %.6g at step %d.', self.best_metric, value, step)
    return True

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def _restore_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def find_checkpoint(workdir: str | None, checkpoint: str) -> tuple[str, int]:
  """Resolves 'best' | 'latest' | a step number | a step directory to (manager dir, step).

  'best' falls back to the latest training checkpoint (with a warning) when the run has no
  evaluated checkpoint yet.
  """
  if os.path.isdir(checkpoint) and os.path.basename(os.path.normpath(checkpoint)).isdigit():
    path = os.path.abspath(os.path.normpath(checkpoint))
    return os.path.dirname(path), int(os.path.basename(path))
  if workdir is None:
    raise errors.InputError(f'--checkpoint={checkpoint} is not a checkpoint step directory and no '
                            '--workdir was given')
  latest_dir = os.path.join(os.path.abspath(workdir), LATEST_DIR)
  best_dir = os.path.join(os.path.abspath(workdir), BEST_DIR)
  if checkpoint == 'best' and os.path.isdir(best_dir):
    step = _manager(best_dir, max_to_keep=None, create=False).latest_step()
    if step is not None:
      return best_dir, step
  if checkpoint in ('best', 'latest'):
    step = (_manager(latest_dir, max_to_keep=None, create=False).latest_step()
            if os.path.isdir(latest_dir) else None)
    if step is None:
      raise errors.MissingFileError(f'{workdir}: no checkpoint found (looked in {latest_dir} and '
                                    f'{best_dir})')
    if checkpoint == 'best':
      logging.warning('%s has no best checkpoint yet; using the latest, step %d.', workdir, step)
    return latest_dir, step
  if checkpoint.isdigit():
    if not os.path.isdir(os.path.join(latest_dir, checkpoint)):
      raise errors.MissingFileError(f'{latest_dir}: no checkpoint for step {checkpoint}')
    return latest_dir, int(checkpoint)
  raise errors.InputError(
      f"--checkpoint must be 'best', 'latest', a step number or a step directory; "
      f'got {checkpoint!r}')


def save_variables(directory: str, step: int, variables, config: Mapping[str, Any]) -> None:
  """Writes variables (no optimiser state) and a config dict as `step` of `directory`, in the
  layout of `best/` (what `restore_variables` reads); returns when the files are written."""
  manager = _manager(directory, max_to_keep=None, create=True)
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeSave({'variables': variables}),
      CONFIG: ocp.args.JsonSave(dict(config))}))
  manager.wait_until_finished()
  manager.close()


def restore_variables(directory: str, step: int, sharding: jax.sharding.Sharding
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads (variables, config dict) of any checkpoint step, without the optimiser state.

  Args:
    directory: a `checkpoints/` or `best/` directory.
    step: the step to read.
    sharding: where to put every variable (e.g. replicated over the current devices); the saved
      device layout does not matter.
  """
  manager = _manager(directory, max_to_keep=None, create=False)
  try:
    return checkpoints.restore(manager, step, sharding)
  finally:
    manager.close()


# Initialisation from other runs (`config.init_from`) ---------------------------------------------

def _leaves(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict of arrays."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _under(path: str, prefix: str) -> bool:
  return not prefix or path == prefix or path.startswith(prefix + '/')


def _rebase(path: str, source: str, target: str) -> str:
  rest = path[len(source):].lstrip('/') if source else path
  return '/'.join(p for p in (target, rest) if p)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    *parents, name = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def map_variables(source, target, mapping, *, reinit=(), collections=None,
                  origin: str = 'init_from'):
  """`target` variables with subtrees replaced by those of `source` (strict), as a new dict.

  Args:
    source: variables of the source checkpoint ({'params': ..., 'batch_stats': ...}).
    target: freshly initialised variables of the run.
    mapping: (source path, target path) pairs of '/'-joined subtree paths within each collection
      ('' = the whole collection), e.g. ('backbone', 'cnn'): stage 1's CNN as stage 2's.
    reinit: target paths (subtrees) that keep their fresh initialisation although the source
      has them (the 2025 finetuning's enlarged position tables; their shapes may differ).
    collections: {target collection: source collection} where they differ, e.g.
      {'params': 'target'}: an I-JEPA run's target encoder (a non-param collection) as params.
    origin: what to name in error messages (the source checkpoint).

  Every source leaf under a mapped source path must land on a target leaf of the same shape and
  dtype unless it falls under `reinit`; target leaves that no mapping covers keep their initial
  values (new parts of the model). Any other mismatch raises ValueError naming the paths: nothing
  is silently dropped or re-initialised (the original's loader drops mismatched tensors).
  """
  tgt = _leaves(target)
  src = _leaves(source)
  for r in reinit:
    if not any(_under(p.split('/', 1)[1], r) for p in tgt if '/' in p):
      raise errors.InputError(f'{origin}: reinit path {r!r} is not in the model')
  out = dict(tgt)
  for collection in sorted({p.split('/')[0] for p in tgt}):
    for source_path, target_path in mapping:
      src_prefix = '/'.join(p for p in ((collections or {}).get(collection, collection),
                                        source_path) if p)
      tgt_prefix = '/'.join(p for p in (collection, target_path) if p)
      picked = {p: v for p, v in src.items() if _under(p, src_prefix)}
      if not picked and collection == 'params':
        raise errors.InputError(
            f'{origin}: no parameters under {src_prefix!r} in the source checkpoint '
            f'(it has {sorted({p.split("/")[1] for p in src if "/" in p})})')
      for path, value in picked.items():
        dest = _rebase(path, src_prefix, tgt_prefix)
        if any(_under(dest.split('/', 1)[1], r) for r in reinit):
          continue
        if dest not in tgt:
          raise errors.InputError(
              f'{origin}: source {path} maps to {dest}, which the model does not '
              'have (check the init_from map and the model config)')
        if tuple(np.shape(value)) != tuple(np.shape(tgt[dest])):
          raise errors.InputError(f'{origin}: source {path} has shape {tuple(np.shape(value))} but '
                                  f'{dest} has {tuple(np.shape(tgt[dest]))}; list it in '
                                  'init_from.<source>.reinit to start it afresh')
        out[dest] = jax.numpy.asarray(value, dtype=tgt[dest].dtype)
  return _unflatten(out)


def init_from_config(init_from: Mapping[str, Any], variables, sharding: jax.sharding.Sharding):
  """Applies every source of `config.init_from` to freshly initialised `variables`.

  `init_from` maps a source name to {'workdir': run folder or step directory, 'checkpoint':
  'best' | 'latest' | step, 'map': [(source path, target path), ...], 'reinit': [target
  paths], 'collections': {target collection: source collection}}; the sources apply in name
  order.
  """
  for name in sorted(init_from):
    spec = init_from[name]
    origin = f'config.init_from.{name}'
    workdir = spec.get('workdir') or ''
    if not workdir:
      raise config_utils.ConfigError(f'{origin}.workdir is empty: set it to the run folder of '
                                     'the previous stage (or a checkpoint step directory)')
    step_dir = os.path.isdir(workdir) and os.path.basename(os.path.normpath(workdir)).isdigit()
    directory, step = (find_checkpoint(None, workdir) if step_dir
                       else find_checkpoint(workdir, str(spec.get('checkpoint') or 'best')))
    source, _ = restore_variables(directory, step, sharding)
    variables = map_variables(
        source, variables, [tuple(m) for m in spec.get('map', [('', '')])],
        reinit=tuple(spec.get('reinit', ()) or ()),
        collections=dict(spec.get('collections', None) or {}),
        origin=f'{origin} ({directory}/{step})')
    logging.info('Initialised %s from %s/%d.', [tuple(m) for m in spec.get('map', [])],
                 directory, step)
  return variables
