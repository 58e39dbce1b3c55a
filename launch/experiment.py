"""The protocol between the trainer and a model package's experiment.

A config names a module (`config.experiment = 'dualtrack_jax.experiments.local_stage1'`) whose
`Experiment(config)` provides everything model-specific. Model packages never import `launch`:
the protocol is duck-typed, and `evaluate` may return any object with `metrics` and `sweeps`.
"""
import dataclasses
import importlib
import inspect
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np

from launch import config_utils


@dataclasses.dataclass
class EvalResult:
  """What `Experiment.evaluate` returns (or any object with these two attributes).

  Attributes:
    metrics: scalar metrics, e.g. {'ddf/5pt-avg_global_displacement_error': 3.2}.
    sweeps: per validation sweep, a dict with 'sweep_id' (str), 'pred_global' and 'gt_global'
      ((N, 4, 4) global transforms, G_0 = I); optionally 'pixel_to_image' (4, 4) and
      'image_shape' (H, W) to plot the image centre and frame outlines instead of the origin.
  """
  metrics: dict[str, float]
  sweeps: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Experiment(Protocol):
  """What the trainer calls; see the module docstring of `launch/train.py` for the contract."""

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

  def evaluate(self, variables: dict[str, Any]) -> EvalResult:
    """Host-side loop over whole validation sweeps."""

  def predict_sweep(self, variables: dict[str, Any], reader: Any) -> np.ndarray:
    """Optional (`launch.predict`): (N-1, 6) relative pose vectors of a sweep file.

    `reader` is a `dualtrack_jax.data.sweeps.SweepReader`. Pose vectors as the h5 format's
    targets: [tx, ty, tz] mm and [rx, ry, rz] degrees of the transform from frame k+1 to frame k,
    in the file's image frame (its `pixel_to_image`). The experiment does its own preprocessing
    (crop, resize) from the raw frames. Prediction builds the experiment with
    `Experiment(config, load_data=False)` (see `load_experiment`).
    """


def load_experiment(config: ml_collections.ConfigDict, *,
                    load_data: bool = True) -> Experiment:
  """Imports `config.experiment` and returns its `Experiment(config)`.

  With load_data=False (prediction), `Experiment(config, load_data=False)`: the model only, no
  dataset read; experiments that do not take the argument cannot be used for prediction.
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
        'Experiment takes no load_data argument), so it does not support prediction')
  return module.Experiment(config, load_data=False)


def check_eval_result(result: Any, source: str = 'Experiment.evaluate') -> EvalResult:
  """Validates a duck-typed evaluation result and returns it as an EvalResult of floats."""
  if not hasattr(result, 'metrics') or not hasattr(result, 'sweeps'):
    raise TypeError(f'{source} must return an object with .metrics and .sweeps, got '
                    f'{type(result).__name__}')
  metrics = {str(k): float(v) for k, v in dict(result.metrics).items()}
  sweeps = list(result.sweeps)
  for i, sweep in enumerate(sweeps):
    missing = {'sweep_id', 'pred_global', 'gt_global'} - set(sweep)
    if missing:
      raise ValueError(f'{source}: sweeps[{i}] lacks keys {sorted(missing)}')
    pred, gt = np.shape(sweep['pred_global']), np.shape(sweep['gt_global'])
    if pred != gt or len(pred) != 3 or pred[1:] != (4, 4):
      raise ValueError(f"{source}: sweeps[{i}] ('{sweep['sweep_id']}'): pred_global {pred} and "
                       f'gt_global {gt} must both be (N, 4, 4)')
  return EvalResult(metrics=metrics, sweeps=sweeps)
