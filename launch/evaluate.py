r"""Evaluates a checkpoint: `python -m launch.evaluate --workdir=DIR [--checkpoint=best] [--out=D]`.

Restores the config and the variables (not the optimiser state) of a checkpoint, builds the
run's experiment, runs its `evaluate` on whole validation sweeps, prints the metrics as a table
and writes `metrics.json` plus one PNG per sweep with the predicted vs. true trajectory.

--checkpoint: 'best' (default; falls back to the latest when the run has no evaluated
checkpoint), 'latest', a step number of `DIR/checkpoints`, or the path of a step directory
(`.../checkpoints/1200`, `.../best/900`; then --workdir is not needed).
--out: default `<workdir>/eval/<checkpoints|best>_<step>`.
"""
import json
import os
from typing import Any

from absl import app
from absl import flags
import jax

from launch import checkpointing
from launch import config_utils
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import plots
from launch import sharding


def format_table(metrics: dict[str, float]) -> str:
  """Two aligned columns: metric name, value."""
  width = max((len(k) for k in metrics), default=6)
  lines = [f'{"metric":<{width}}  value', f'{"-" * width}  ------------']
  lines += [f'{k:<{width}}  {v:.6g}' for k, v in sorted(metrics.items())]
  return '\n'.join(lines)


def evaluate_checkpoint(workdir: str | None, checkpoint: str = 'best', out: str | None = None,
                        outline_every: int = 0) -> dict[str, Any]:
  """Evaluates one checkpoint and writes metrics.json and the trajectory PNGs into `out`.

  Returns:
    The content of metrics.json: {'checkpoint', 'step', 'metrics'}.
  """
  directory, step = checkpointing.find_checkpoint(workdir, checkpoint)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    variables, config_json = checkpointing.restore_variables(directory, step,
                                                             sharding.replicated(mesh))
    config = config_utils.from_json_dict(config_json)
    experiment = experiment_lib.load_experiment(config)
    result = experiment_lib.check_eval_result(experiment.evaluate(variables))
  checkpoint_dir = os.path.join(directory, str(step))
  out = out or os.path.join(os.path.dirname(directory), 'eval',
                            f'{os.path.basename(directory)}_{step}')
  os.makedirs(out, exist_ok=True)
  summary = {'checkpoint': checkpoint_dir, 'step': step, 'metrics': result.metrics}
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  for sweep in result.sweeps:
    fig = plots.sweep_figure(sweep, outline_every=outline_every)
    fig.savefig(os.path.join(out, f'trajectory_{plots.safe_filename(sweep["sweep_id"])}.png'))
  print(f'{checkpoint_dir} (step {step})\n{format_table(result.metrics)}\n'
        f'Wrote {os.path.join(out, "metrics.json")} and {len(result.sweeps)} trajectory plot(s).')
  return summary


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('workdir', None, 'Run folder (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', a step number or a step directory.")
  flags.DEFINE_string('out', None, 'Output folder for metrics.json and the plots.')
  flags.DEFINE_integer('outline_every', 0, 'Draw frame outlines every N frames (0 = off).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.workdir is None and not os.path.isdir(f.checkpoint):
    raise app.UsageError('--workdir is required unless --checkpoint is a step directory')
  metric_writer.quiet_library_logs()
  evaluate_checkpoint(f.workdir, f.checkpoint, f.out, f.outline_every)


if __name__ == '__main__':
  define_flags()
  app.run(main)
