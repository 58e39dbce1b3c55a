"""How the runtime finds a model package, and what a package gives it.

`launch` names no model. A model package registers one module, its *interface*, under the
entry-point group `ultrasound_jax.models` of its distribution (setup.cfg):

    [options.entry_points]
    ultrasound_jax.models =
        dualtrack = dualtrack_jax.interface

Runs (train, evaluate, predict, export) belong to the registered package whose top-level
package holds `config.experiment`; commands without a run (`launch.convert --model=NAME`,
`launch.benchmark --model=NAME`) look the name up in every registered interface. A package that
is not installed with pip registers the same way with an `entry_points.txt` in a `*.dist-info`
folder on `sys.path` (what pip writes), as the tests do for their toy model.

The interface module may define any of these (a command that needs a missing one says so):

  define_predict_flags()
      Defines the package's absl flags of `launch.predict` (e.g. --sweep, --task). Called for
      every registered package before the command line is parsed, so flag names must differ
      between packages (absl refuses a second definition).
  plan_predictions(run, inputs, flags) -> list[tuple[str, Callable[[str, str], tuple]]]
      `launch.predict`: checks every input first, then returns one (name, write) per output unit;
      `write(folder, name)` writes that unit's files into an empty temporary folder and returns
      (text to print, metrics {name: float}, possibly empty). The runtime makes the names safe as
      file names (refusing two equal ones) and publishes each unit when complete (see
      PREDICTION_LAYOUT), so a crash never leaves a result that looks complete. `run` has
      .experiment (built with load_data=False), .variables, .config, .checkpoint_dir, .step and
      .run_dir (`launch.experiment.Run`); `inputs` are the positional arguments; `flags` is absl's
      FlagValues.
  PREDICTION_LAYOUT: 'folders' (default) or 'files'
      'folders': each unit's folder becomes OUT/<name>, replacing an earlier one; 'files': its
      files are moved into OUT, each replaced atomically (they should start with <name>).
  compare_figures(results) -> Mapping[str, figure]
      `launch.evaluate` of several runs of this package: figures that put them side by side,
      given {run name: what each run's `Experiment.evaluate` returned}.
  evaluate_ensemble(checkpoints, config) -> (list[Mapping[str, float]],
                                             Mapping[str, Mapping[str, float]])
      `launch.evaluate --ensemble`: the runs' checkpoints (step directories, in order) are the
      members of one ensemble, which the package loads, checks (one architecture) and runs
      together; `config` is the first run's config with --set applied (validation data and
      settings). Returns each member's metrics, in order, and {ensemble rule: its metrics}.
  CONVERTERS: Mapping[str, str]
      `launch.convert --model=NAME` names this package converts from PyTorch, with a one-line
      description each.
  converter_config(name, variant) -> str
      The config file ('path.py[:arg]') that a conversion starts from; `variant` is --variant.
  from_torch(name, state_dict, config, *, source, allow_reinit, seed) -> (variables, config)
      A state dict (torch key -> NumPy array, read by `launch.torch_io`) to the variables of a
      run and its config (the loaded config file, completed); strict, errors name `source`.
  to_torch(variables, config, *, source) -> dict[str, np.ndarray]
      A run's variables to the original's state dict (config: the run's config dict).
  INFERENCE_BENCHMARKS: Mapping[str, Callable[[options], Iterable[Mapping]]]
      `launch.benchmark --bench=inference --model=NAME`: the cases of `launch.bench_inference`
      (each a mapping of `bench_inference.Case`'s fields, variants a mapping each).
  BENCHMARKS: Mapping[str, Callable[[int], None]]
      Other `launch.benchmark --bench=NAME` measurements, given --steps; they print their results.
  TORCH_TRAIN_STEPS: Mapping[str, Callable[..., Callable[[], None]]]
      `launch.benchmark --bench=train --original=PATH`: {experiment module: make_step}, where
      make_step(config, batch, *, original, device) builds the original network's training step
      on that batch (NumPy) and device and returns a function running one optimiser step.
  BENCHMARK_SUITES: Mapping[str, Callable[[str], Sequence[Mapping]]]
      `launch.benchmark --suite=NAME`: the package's cases of suite NAME (e.g. 'gpu') at a scale
      ('full' or 'tiny'), as described in launch/bench_suite.py.

What the experiment of a run provides (`config.experiment`) is in launch/experiment.py. A package
reports bad input (files, config keys, options) with the errors of `ultrasound_common.errors`, which
every command prints as one line; any other exception is treated as a bug (traceback).
"""
from collections.abc import Callable
import functools
import importlib
from importlib import metadata
import types
from typing import Any

from ultrasound_common import errors

GROUP = 'ultrasound_jax.models'


class ModelPackageError(errors.InputError):
  """No registered model package provides what a command asked for."""


@functools.cache
def interfaces() -> dict[str, types.ModuleType]:
  """Registered name -> imported interface module, for every entry point of the group."""
  found = {}
  for entry in metadata.entry_points(group=GROUP):
    if entry.name in found:
      continue  # The same distribution seen twice on sys.path (an editable install and a path).
    try:
      found[entry.name] = importlib.import_module(entry.value)
    except ImportError as e:
      raise ModelPackageError(
          f"model package '{entry.name}' ({GROUP} entry point) cannot be imported: "
          f'{entry.value}: {e}') from e
  return found


def for_experiment(experiment: str) -> types.ModuleType:
  """The interface of the registered package that holds the module `experiment`."""
  top = str(experiment).partition('.')[0]
  for module in interfaces().values():
    if module.__name__.partition('.')[0] == top:
      return module
  raise ModelPackageError(
      f"config.experiment '{experiment}': no registered model package holds '{top}' (registered: "
      f'{", ".join(f"{k} = {m.__name__}" for k, m in sorted(interfaces().items())) or "none"}); '
      f'a package registers its interface module under the entry-point group {GROUP}')


def named(attribute: str) -> dict[str, tuple[types.ModuleType, Any]]:
  """{name: (interface, value)} of the mapping `attribute` (e.g. 'CONVERTERS') of every package."""
  out = {}
  for module in interfaces().values():
    for name, value in dict(getattr(module, attribute, {}) or {}).items():
      if name in out:
        raise ModelPackageError(f"{attribute}: '{name}' is defined by both "
                                f'{out[name][0].__name__} and {module.__name__}')
      out[name] = (module, value)
  return out


def lookup(attribute: str, name: str, what: str) -> tuple[types.ModuleType, Any]:
  """(interface, value) of `name` in every package's `attribute`; a clear error if unknown."""
  table = named(attribute)
  if name not in table:
    raise ModelPackageError(
        f'{what}={name!r}: unknown; known: {", ".join(sorted(table)) or "none"}')
  return table[name]


def function(module: types.ModuleType, name: str, what: str) -> Callable[..., Any]:
  """`module.name`, or a clear error saying that the package does not offer `what`."""
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ModelPackageError(f'model package {module.__name__} does not offer {what} (it defines '
                            f'no {name})')
  return fn
