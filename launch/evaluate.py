r"""Evaluates a checkpoint: `python -m launch.evaluate --workdir=DIR [--checkpoint=best] [--out=D]`.

Restores the config and the variables (not the optimiser state) of a checkpoint, builds the
run's experiment, runs its `evaluate`, prints the metrics as a table and writes `metrics.json`
plus one PNG per figure the experiment returns (DualTrack: each validation sweep's predicted vs.
true trajectory; `<name>.png` with '/' -> '_').

--checkpoint: 'best' (default; falls back to the latest when the run has no evaluated
checkpoint), 'latest', a step number of `DIR/checkpoints`, or the path of a step directory
(`.../checkpoints/1200`, `.../best/900`; then --workdir is not needed).
--out: default `<workdir>/eval/<checkpoints|best>_<step>`.
--set KEY=VALUE (repeatable): changes a key of the run's saved config for this evaluation, e.g.
  --set=data.dataset=tus-rec (another dataset's validation split) or --set=plot_outline_every=10
  (DualTrack: frame outlines every 10 frames in the trajectory plots). VALUE is a Python literal
  or a plain string; the key must exist in the saved config.
"""
import ast
import json
import os
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections

from launch import checkpointing
from launch import config_utils
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import plots
from launch import sharding
from launch import xla_flags


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Sets each 'dotted.key=value' of `overrides` in `config`; ConfigError on a bad one."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise config_utils.ConfigError(f'--set={item}: expected KEY=VALUE')
    message = config_utils.unknown_override_message(config, [f'--set.{key}'], 'set')
    if message:
      raise config_utils.ConfigError(message)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise config_utils.ConfigError(f'--set={item}: {e}') from e


def evaluate_checkpoint(workdir: str | None, checkpoint: str = 'best', out: str | None = None,
                        overrides: list[str] = ()) -> dict[str, Any]:
  """Evaluates one checkpoint and writes metrics.json and the figures into `out`.

  Returns:
    The content of metrics.json: {'checkpoint', 'step', 'metrics'}.
  """
  directory, step = checkpointing.find_checkpoint(workdir, checkpoint)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    variables, config_json = checkpointing.restore_variables(directory, step,
                                                             sharding.replicated(mesh))
    config = config_utils.from_json_dict(config_json)
    apply_overrides(config, list(overrides))
    experiment = experiment_lib.load_experiment(config)
    result = experiment_lib.check_eval_result(experiment.evaluate(variables))
  checkpoint_dir = os.path.join(directory, str(step))
  out = out or os.path.join(os.path.dirname(directory), 'eval',
                            f'{os.path.basename(directory)}_{step}')
  os.makedirs(out, exist_ok=True)
  summary = {'checkpoint': checkpoint_dir, 'step': step, 'metrics': result.metrics}
  if overrides:
    summary['overrides'] = list(overrides)
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  for name, figure in result.figures.items():
    plots.save_png(figure, os.path.join(out, f'{plots.safe_filename(name)}.png'))
  print(f'{checkpoint_dir} (step {step})\n{metric_writer.format_table(result.metrics)}\n'
        f'Wrote {os.path.join(out, "metrics.json")} and {len(result.figures)} figure(s).')
  return summary


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('workdir', None, 'Run folder (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', a step number or a step directory.")
  flags.DEFINE_string('out', None, 'Output folder for metrics.json and the figures.')
  flags.DEFINE_multi_string('set', [], 'KEY=VALUE: change a key of the saved config (repeatable).')
  flags.DEFINE_integer('outline_every', None, 'Renamed: use --set=plot_outline_every=N.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.outline_every is not None:
    raise app.UsageError('--outline_every was renamed: frame outlines are a setting of the '
                         'DualTrack configs now, --set=plot_outline_every=N')
  if f.workdir is None and not os.path.isdir(f.checkpoint):
    raise app.UsageError('--workdir is required unless --checkpoint is a step directory')
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  try:
    evaluate_checkpoint(f.workdir, f.checkpoint, f.out, f.set)
  except config_utils.ConfigError as e:
    raise SystemExit(f'launch.evaluate: error: {e}') from e


if __name__ == '__main__':
  define_flags()
  app.run(main)
