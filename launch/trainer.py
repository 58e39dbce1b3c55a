"""The training loop shared by every model and stage: `train_and_evaluate(config, workdir)`.

The trainer knows nothing model-specific; `config.experiment` names the module whose
`Experiment(config)` provides data, init, loss and evaluation (see `launch/experiment.py`). The
config keys it reads are listed in the docstring of `launch/train.py`.
"""
from collections.abc import Mapping
import functools
import json
import os
import signal
import threading
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from launch import checkpointing
from launch import config_utils
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import optim
from launch import plots
from launch import sharding
from ultrasound_common import errors


class NonFiniteLossError(errors.Error, RuntimeError):
  """The loss or gradient norm became NaN/inf; the state after that step is not saved."""


class Interrupted(errors.Error):
  """SIGINT or SIGTERM stopped training; a checkpoint of the current step was saved first."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum  # The shell's convention for a process ended by a signal.


class InterruptRequest:
  """Turns the first SIGINT (Ctrl-C) or SIGTERM (preemption, a scheduler) into a request that the
  loop honours after the current step; a second one ends the process at once.

  Use as a context manager around the loop; it installs the handlers only in the main thread (the
  only one that receives signals) and restores the previous ones on exit.
  """
  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> 'InterruptRequest':
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      logging.error('%s again: exiting now, without waiting for the checkpoint.',
                    signal.Signals(signum).name)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    logging.warning('%s: saving a checkpoint after the current step, then stopping (send it '
                    'again to exit at once).', signal.Signals(signum).name)

  def requested(self) -> bool:
    """Whether to stop now. With several processes every one gets the same answer: a collective
    call that all of them must make at the same step."""
    wanted = self.signum is not None
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(wanted))
      wanted = bool(np.any(flags))
      if wanted and self.signum is None:
        self.signum = signal.SIGTERM  # Another process was told to stop.
    return wanted


def init_state(experiment, tx: optax.GradientTransformation, rng: jax.Array,
               batch: Mapping[str, jax.Array]) -> dict[str, Any]:
  """The train state: step, typed RNG key, model variables and optimiser state."""
  init_rng, train_rng = jax.random.split(rng)
  variables = dict(experiment.init(init_rng, batch))
  if 'params' not in variables:
    raise errors.InputError(f'Experiment.init must return a dict with "params", got keys '
                            f'{sorted(variables)}')
  return {'step': jnp.zeros((), jnp.int32), 'rng': train_rng, 'variables': variables,
          'opt_state': tx.init(variables['params'])}


def step_constants(experiment, variables, mesh) -> dict[str, Any]:
  """The experiment's optional `step_constants()`, replicated over `mesh` (launch/experiment.py).

  They reach the jitted step as an argument: an array closed over by the step would be embedded in
  the compiled program (five teachers: gigabytes of constants).
  """
  constants = dict(experiment.step_constants()) if hasattr(experiment, 'step_constants') else {}
  clash = sorted(set(constants) & set(variables))
  if clash:
    raise errors.InputError(f'Experiment.step_constants names collections {clash} that '
                            'Experiment.init also creates')
  # From host memory, so that every process puts its identical copy on its devices.
  return jax.device_put(jax.device_get(constants), sharding.replicated(mesh))


def make_train_step(experiment, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    frozen=()):
  """The pure update function (state, batch[, constants]) -> (state, metrics), to be jitted by
  the caller; `constants` are the experiment's `step_constants()` (launch/experiment.py)."""

  def train_step(state, batch, constants=None):
    step, variables = state['step'], state['variables']
    # A fresh key per step, derived from the step: identical after a resume, and independent of
    # how the batch is sharded (threefry is partitionable).
    rng = jax.random.fold_in(state['rng'], step)

    def loss_of(params):
      return experiment.loss_fn({**(constants or {}), **variables, 'params': params}, batch, rng)

    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        variables['params'])
    unknown = set(updates) - (set(variables) - {'params'})
    if unknown:
      raise errors.InputError(
          f'Experiment.loss_fn returned updates for collections {sorted(unknown)} '
          f'that Experiment.init did not create (have {sorted(variables)})')
    opt_updates, opt_state = tx.update(grads, state['opt_state'], variables['params'])
    params = optax.apply_updates(variables['params'], opt_updates)
    mask = optim.trainable_mask(params, frozen)
    metrics = {**metrics, 'loss': loss, 'grad_norm': optim.masked_global_norm(grads, mask),
               'lr': schedule(step)}
    new_state = {'step': step + 1, 'rng': state['rng'],
                 'variables': {**variables, **updates, 'params': params}, 'opt_state': opt_state}
    return new_state, metrics

  return train_step


def _steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, int]:
  """Total, warmup, eval, log and checkpoint intervals in optimiser steps (the runtime keys are
  in `config`: `config_utils.with_runtime_keys`)."""
  if config.total_steps is not None:
    total, source = int(config.total_steps), f'config.total_steps={config.total_steps}'
  else:
    epochs = config_utils.require(config, 'num_epochs')
    total = int(epochs * steps_per_epoch)
    source = f'config.num_epochs={epochs} x {steps_per_epoch} steps per epoch'
  if total <= 0:
    raise config_utils.ConfigError(f'{source} gives {total} steps; the run needs at least one')
  if config.eval_every_steps:
    eval_every = int(config.eval_every_steps)
  elif config.eval_every_epochs:
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
  else:
    eval_every = total
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if warmup < 0:
    raise config_utils.ConfigError(f'config.warmup_epochs={config.warmup_epochs} is negative')
  intervals = {k: int(config[f'{k}_every_steps']) for k in ('log', 'checkpoint')}
  for key, value in intervals.items():
    if value <= 0:
      raise config_utils.ConfigError(f'config.{key}_every_steps={value} must be positive')
  return {'total': total, 'warmup': warmup, 'eval': max(eval_every, 1), **intervals}


def _check_finite(pending: list[tuple[int, dict[str, jax.Array]]], last_good: int | None,
                  workdir: str) -> list[dict[str, float]]:
  """Host values of the pending step metrics; raises NonFiniteLossError at the first bad step."""
  values = jax.device_get([m for _, m in pending])
  for (step, _), metrics in zip(pending, values):
    loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      kept = (f'the last good checkpoint is step {last_good} in '
              f'{os.path.join(workdir, checkpointing.LATEST_DIR)}' if last_good is not None
              else 'no checkpoint was written')
      raise NonFiniteLossError(
          f'Non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm}); stopping '
          f'without saving the state after that step; {kept}.')
  return [{k: float(v) for k, v in m.items()} for m in values]


def _evaluate(experiment, state, step: int, config, writer: metric_writer.MetricWriter
              ) -> experiment_lib.EvalResult:
  """Runs the experiment's evaluation, logs its metrics and its first figures."""
  result = experiment_lib.check_eval_result(experiment.evaluate(state['variables']))
  logging.info('eval @ step %d: %s', step,
               ', '.join(f'{k}={v:.6g}' for k, v in sorted(result.metrics.items())))
  writer.scalars(step, {f'eval/{k}': v for k, v in result.metrics.items()})
  if jax.process_index() == 0:
    shown = list(result.figures.items())[:int(config.num_eval_figures)]
    writer.images(step, {f'eval/{name}': plots.to_array(figure) for name, figure in shown})
  writer.flush()
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config.experiment`, resuming from `workdir` if it holds checkpoints.

  Args:
    config: the run's config (keys documented in launch/train.py).
    workdir: output folder: checkpoints/, best/, tensorboard/.

  Returns:
    The metrics of the last evaluation ({} if none ran in this call).

  Raises:
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    config_utils.ConfigError: a missing or inconsistent config key.
  """
  workdir = os.path.abspath(workdir)
  config = config_utils.with_runtime_keys(config)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Body of `train_and_evaluate`, under the mesh context."""
  # ============================================================================================
  # Experiment and sizes. Everything that can fail on bad input (config keys, missing data)
  # runs before the workdir is touched, so a failed start leaves nothing behind.
  # ============================================================================================
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_utils.ConfigError(f'--workdir={workdir} is a file, not a run folder')
  batch_size = int(config_utils.require(config, 'batch_size'))
  if batch_size <= 0:
    raise config_utils.ConfigError(f'config.batch_size={batch_size} must be positive')
  experiment = experiment_lib.load_experiment(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size % mesh.devices.size or batch_size % process_count:
    raise config_utils.ConfigError(
        f'config.batch_size={batch_size} must be divisible by the number of devices '
        f'({mesh.devices.size}) and of processes ({process_count})')
  steps_per_epoch = int(experiment.steps_per_epoch)
  steps = _steps(config, steps_per_epoch)
  total_steps = steps['total']
  config_json = config_utils.to_json_dict(config)
  logging.info('%d steps (%d per epoch, %d warmup) at global batch %d on %d devices, '
               '%d process(es).', total_steps, steps_per_epoch, steps['warmup'], batch_size,
               mesh.devices.size, process_count)

  # ============================================================================================
  # Input pipeline: this process's shard of every global batch.
  # ============================================================================================
  train_ds = experiment.train_dataset(seed=int(config_utils.require(config, 'seed')),
                                      shard_index=process_index, shard_count=process_count)
  # One batch from a separate iterator gives the shapes for init; the training iterator starts
  # untouched, so its checkpointed position always equals the number of steps done.
  example_iter = iter(train_ds)
  example = next(example_iter)
  if hasattr(example_iter, 'close'):
    example_iter.close()
  local_rows = {k: np.shape(v)[0] for k, v in example.items()}
  if set(local_rows.values()) != {batch_size // process_count}:
    raise errors.InputError(
        f'Experiment.train_dataset yields per-process batches with leading sizes '
        f'{local_rows}; expected config.batch_size // processes = '
        f'{batch_size // process_count}')
  if config.num_workers:
    train_ds = train_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(config.num_workers)))
  batch_sharding = sharding.batch_sharding(mesh)
  example = sharding.global_batch(example, batch_sharding)

  # ============================================================================================
  # Model, optimiser and the sharding of the train state.
  # ============================================================================================
  frozen = tuple(config.frozen or ())
  tx, schedule = optim.make_optimizer(config_utils.require(config, 'optim'),
                                      total_steps=total_steps, warmup_steps=steps['warmup'],
                                      frozen=frozen)
  init_fn = functools.partial(init_state, experiment, tx)
  rng = jax.random.key(int(config.seed))
  abstract_state = jax.eval_shape(init_fn, rng, example)
  state_sharding = sharding.state_shardings(
      mesh, abstract_state, fsdp=bool(config.fsdp),
      fsdp_min_size_mb=float(config.fsdp_min_size_mb))
  num_params = sum(int(np.prod(x.shape)) for x in
                   jax.tree.leaves(abstract_state['variables']['params']))
  logging.info('%d parameters (%.1f MB float32).', num_params, num_params * 4 / 2**20)

  # ============================================================================================
  # Checkpoints and logs (first writes to the workdir); resume or initialise.
  # ============================================================================================
  ckpts = checkpointing.RunCheckpoints(workdir, keep=int(config.keep_checkpoints),
                                       best_metric=config.best_metric or None,
                                       best_mode=config.best_mode)
  writer = metric_writer.MetricWriter(workdir, enabled=process_index == 0)
  train_iter = iter(train_ds)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_state, state_sharding)
  start, state = ckpts.resume(target, train_iter, config_json)
  if start is not None:
    logging.info('Resumed from %s at step %d.', workdir, start)
  else:
    start = 0
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng, example)
    if config.init_from:
      # Only a fresh run starts from other runs' weights; a resumed one has its own. Adam's
      # moments start at zero whatever the parameters, so only the variables change.
      state['variables'] = jax.device_put(
          checkpointing.init_from_config(config.init_from, state['variables'],
                                         sharding.replicated(mesh)),
          state_sharding['variables'])
    writer.text(0, 'config', '```\n' + json.dumps(config_json, indent=2) + '\n```')

  constants = step_constants(experiment, abstract_state['variables'], mesh)
  train_step = jax.jit(
      make_train_step(experiment, tx, schedule, frozen),
      in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))

  # ============================================================================================
  # Train loop. Metrics stay on device between log points (no per-step host sync); they are
  # checked for NaN/inf before anything is logged, saved or evaluated.
  # ============================================================================================
  progress = metric_writer.Progress(start, total_steps)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  eval_metrics: dict[str, float] = {}
  with InterruptRequest() as interrupt:
    try:
      for step in range(start, total_steps):
        batch = sharding.global_batch(next(train_iter), batch_sharding)
        state, metrics = train_step(state, batch, constants)
        pending.append((step, metrics))
        done = step + 1
        last = done == total_steps
        do_log = done % steps['log'] == 0 or last
        do_save = done % steps['checkpoint'] == 0 or last
        do_eval = done % steps['eval'] == 0 or last
        # One process: honoured after every step. Several: where they sync anyway (log, save and
        # eval steps), so that all stop at the same step.
        stop = ((jax.process_count() == 1 or do_log or do_save or do_eval)
                and interrupt.requested())
        if stop:
          do_save = True
        if not (do_log or do_save or do_eval):
          continue
        values = _check_finite(pending, ckpts.latest_step(), workdir)
        pending = []
        if do_log:
          mean = {k: float(np.mean([v[k] for v in values])) for k in values[-1]}
          mean['lr'] = values[-1]['lr']
          rate, eta = progress.update(done)
          metric_writer.log_train_line(done, total_steps, mean, rate, eta)
          writer.scalars(done, {**{f'train/{k}': v for k, v in mean.items()},
                                'train/steps_per_sec': rate})
        if do_save:
          ckpts.save(done, state, train_iter, config_json)
        if stop and not last:
          ckpts.wait_until_finished()
          name = signal.Signals(interrupt.signum).name
          raise Interrupted(f'{name} at step {done} of {total_steps}: saved '
                            f'{ckpts.step_dir(done)}; run the same command again to resume',
                            interrupt.signum)
        if do_eval:
          eval_metrics = _evaluate(experiment, state, done, config, writer).metrics
          ckpts.maybe_save_best(done, state['variables'], eval_metrics, config_json)
      if start >= total_steps:
        logging.info('Nothing to do: the checkpoint in %s is already at step %d of %d.', workdir,
                     start, total_steps)
    finally:
      # Also on errors: finish writing the last good checkpoint before the process exits.
      ckpts.wait_until_finished()
      ckpts.close()
      writer.close()
      if hasattr(train_iter, 'close'):
        train_iter.close()
  return eval_metrics
