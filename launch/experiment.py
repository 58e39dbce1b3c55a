"""The protocol between the runtime and a model package's experiment.

A config names a module (`config.experiment = 'dualtrack_jax.experiments.local_stage1'`) whose
`Experiment(config)` provides everything model-specific about a run. Model packages never import
`launch`: the protocol is duck-typed, and `evaluate` may return any object with `metrics` (and
`figures`). What a package provides beyond its runs is in launch/models.py.
"""
import dataclasses
import importlib
import inspect
import os
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np

from launch import checkpointing
from launch import config_utils
from ultrasound_common import errors


@dataclasses.dataclass
class EvalResult:
  """What `Experiment.evaluate` returns (or any object with these two attributes).

  Attributes:
    metrics: scalar metrics, e.g. {'ddf/5pt-avg_global_displacement_error': 3.2}.
    figures: named pictures, each a matplotlib Figure or an (H, W, 3) uint8 array, e.g.
      {'trajectory/sweep_3': fig}; the trainer logs the first `config.num_eval_figures` to
      TensorBoard as `eval/<name>`, and `launch.evaluate` writes each as `<name>.png` ('/' -> '_').
  """
  metrics: dict[str, float]
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)


class Experiment(Protocol):
  """What the runtime calls; see the module docstring of `launch/train.py` for the config keys.

  The class is built as `Experiment(config)` for training and evaluation, and as
  `Experiment(config, load_data=False)` (the model only, no dataset read) for `launch.predict`
  and `launch.export`. Model-level prediction from files (sweeps, images) is the package's
  interface (launch/models.py), which calls the experiment's own methods.
  """

  @property
  def steps_per_epoch(self) -> int:
    """Optimiser steps per epoch (at the configured global batch size)."""

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int) -> grain.IterDataset:
    """Endless per-process batches (dict of NumPy arrays, config.batch_size // shard_count rows).

    Process p's batch j must be rows [p*b, (p+1)*b) of the single-process batch j (b = the
    per-process batch size): batch by b, then slice, `ds.batch(b)[shard_index::shard_count]`,
    after shuffle/random_map (per-element RNG) so that each process reads only its rows. The
    trainer concatenates the processes' batches in process order, so N processes then see the
    single-process batches row for row, including any per-row randomness drawn in the step
    (dropout). Slicing before batching (`ds[shard_index::shard_count].batch(b)`) gives the same
    rows in another order: exact for order-invariant steps (mean losses, BatchNorm), but not with
    dropout. No `mp_prefetch` here: the trainer adds worker processes (config.num_workers).
    """

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """Model variables {'params': ..., and e.g. 'batch_stats': ...} from a global batch."""

  def loss_fn(self, variables: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array
              ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    """Train-mode forward: (loss, (scalar metrics, updated non-param collections))."""

  def step_constants(self) -> dict[str, Any]:
    """Optional: {collection: tree of arrays} that `loss_fn` finds in its `variables` but that are
    neither trained nor saved, e.g. a distillation's teachers.

    The trainer passes them to the jitted step as an argument, replicated over the mesh (arrays
    closed over by `loss_fn` would be embedded in the compiled program); they get no gradient and
    no optimiser state, are in no checkpoint, and a resumed run takes them from the experiment
    again. Their names must differ from those of `init`'s collections.
    """

  def evaluate(self, variables: dict[str, Any]) -> EvalResult:
    """Host-side evaluation on the validation data: metrics and figures."""

  def export_spec(self, variables: dict[str, Any], options: dict[str, str]) -> dict[str, Any]:
    """Optional (`launch.export`): the deployable function of the model and what it needs.

    A mapping with 'fn' (fn(variables, *inputs) -> {name: array}, every weight from
    `variables`), 'variables' (those to ship), 'inputs' (name, shape with symbolic dimension
    names, dtype, description), 'outputs' ({name: description}) and optionally 'constraints',
    'options' (those read, defaults filled in) and 'metadata'; `options` are the --option
    KEY=VALUE strings. The contract is in the module docstring of launch/export.py.
    """


def load_experiment(config: ml_collections.ConfigDict, *,
                    load_data: bool = True) -> Experiment:
  """Imports `config.experiment` and returns its `Experiment(config)`.

  With load_data=False (prediction, export), `Experiment(config, load_data=False)`: the model
  only, no dataset read; experiments that do not take the argument cannot be used for those.
  """
  name = config_utils.require(config, 'experiment')
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name is not None and name.startswith(e.name):
      raise config_utils.ConfigError(
          f"config.experiment: cannot import module '{name}' ({e})") from e
    raise
  if not hasattr(module, 'Experiment'):
    raise config_utils.ConfigError(
        f"config.experiment: module '{name}' ({module.__file__}) defines no Experiment class")
  if load_data:
    return module.Experiment(config)
  if 'load_data' not in inspect.signature(module.Experiment).parameters:
    raise config_utils.ConfigError(
        f"config.experiment: '{name}' cannot build its model without its dataset (its "
        'Experiment takes no load_data argument), so it supports neither prediction nor export')
  return module.Experiment(config, load_data=False)


def check_eval_result(result: Any, source: str = 'Experiment.evaluate') -> EvalResult:
  """Validates a duck-typed evaluation result and returns it as an EvalResult of floats."""
  if not hasattr(result, 'metrics'):
    raise TypeError(f'{source} must return an object with .metrics (and optionally .figures), '
                    f'got {type(result).__name__}')
  metrics = {str(k): float(v) for k, v in dict(result.metrics).items()}
  figures = dict(getattr(result, 'figures', None) or {})
  for name, figure in figures.items():
    if isinstance(figure, np.ndarray) and (figure.ndim != 3 or figure.shape[-1] != 3
                                           or figure.dtype != np.uint8):
      raise errors.InputError(
          f'{source}: figures[{name!r}] is an array of shape {figure.shape} and '
          f'dtype {figure.dtype}; expected (H, W, 3) uint8 or a matplotlib Figure')
  return EvalResult(metrics=metrics, figures=figures)


@dataclasses.dataclass
class Run:
  """A checkpoint ready for inference: its experiment (model only), variables and config."""
  experiment: Any
  variables: Any
  config: ml_collections.ConfigDict
  checkpoint_dir: str  # The step folder, e.g. '<run>/best/900'.
  step: int

  @property
  def run_dir(self) -> str:
    return os.path.dirname(os.path.dirname(self.checkpoint_dir))


def restore_run(checkpoint: str) -> Run:
  """Restores a run folder's best (else latest) checkpoint or a step folder, on one device.

  Inference (prediction, export) runs one input at a time: one device, whatever the layout the
  run was saved with. The experiment is built with load_data=False.
  """
  if not os.path.isdir(checkpoint):
    raise errors.MissingFileError(f'--checkpoint={checkpoint}: no such folder')
  step_dir = os.path.basename(os.path.normpath(checkpoint)).isdigit()
  directory, step = checkpointing.find_checkpoint(None if step_dir else checkpoint,
                                                  checkpoint if step_dir else 'best')
  variables, config_json = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  config = config_utils.from_json_dict(config_json)
  return Run(experiment=load_experiment(config, load_data=False), variables=variables,
             config=config, checkpoint_dir=os.path.join(directory, str(step)), step=step)
