r"""Evaluates a checkpoint: `python -m launch.evaluate --workdir=DIR [--checkpoint=best] [--out=D]`.

Restores the config and the variables (not the optimiser state) of a checkpoint, builds the
run's experiment, runs its `evaluate`, prints the metrics as a table and writes `metrics.json`
plus one PNG per figure the experiment returns (DualTrack: each validation sweep's predicted vs.
true trajectory; `<name>.png` with '/' -> '_').

--checkpoint: 'best' (default; falls back to the latest when the run has no evaluated
checkpoint), 'latest', a step number of `DIR/checkpoints`, or the path of a step directory
(`.../checkpoints/1200`, `.../best/900`; then --workdir is not needed).
--out: default `<workdir>/eval/<checkpoints|best>_<step>`.
Several runs side by side: `--workdir=A --workdir=B ...` evaluates each (as above, into each run's
own eval folder) and prints one table, a column per run and a row per metric, writes it as
`comparison.json` and `comparison.md` into --out (default `<common parent>/comparison`), with the
figures the runs' model package draws to compare them (DualTrack: per sweep, the true trajectory
and one line per run). Runs are named by their folder (`--name` gives other names, in order).
--ensemble (with several --workdir): the runs are the members of an ensemble; their model package
evaluates them together (SONICHU: member variables stacked, one vmapped program, the
coordinate-wise median) on the first run's validation data and settings. One table, a column per
member and one per ensemble rule (e.g. 'median of 3'), written as `ensemble.json` and
`ensemble.md` into --out (default `<common parent>/ensemble`).

--set KEY=VALUE (repeatable): changes a key of the run's saved config for this evaluation, e.g.
  --set=data.dataset=tus-rec (another dataset's validation split) or --set=plot_outline_every=10
  (DualTrack: frame outlines every 10 frames in the trajectory plots). VALUE is a Python literal
  or a plain string; the key must exist in the saved config.
"""
import ast
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
from launch import models
from launch import plots
from launch import sharding
from launch import xla_flags
from ultrasound_common import checkpoints as checkpoint_reading
from ultrasound_common import errors
from ultrasound_common import files


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


def _evaluate(workdir: str | None, checkpoint: str, overrides) -> tuple[Any, dict[str, Any]]:
  """The experiment's own evaluation result, and {'config', 'directory', 'step'} of the run."""
  directory, step = checkpointing.find_checkpoint(workdir, checkpoint)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    variables, config_json = checkpointing.restore_variables(directory, step,
                                                             sharding.replicated(mesh))
    config = config_utils.from_json_dict(config_json)
    apply_overrides(config, list(overrides))
    experiment = experiment_lib.load_experiment(config)
    result = experiment.evaluate(variables)
  return result, {'config': config, 'directory': directory, 'step': step}


def _write(out: str, summary: dict[str, Any], figures, name: str) -> None:
  os.makedirs(out, exist_ok=True)
  files.write_json(os.path.join(out, name), summary, indent=2, sort_keys=True)
  for figure_name, figure in figures.items():
    plots.save_png(figure, os.path.join(out, f'{plots.safe_filename(figure_name)}.png'))


def evaluate_checkpoint(workdir: str | None, checkpoint: str = 'best', out: str | None = None,
                        overrides: list[str] = (), *, raw: list | None = None) -> dict[str, Any]:
  """Evaluates one checkpoint and writes metrics.json and the figures into `out`.

  Returns:
    The content of metrics.json: {'checkpoint', 'step', 'metrics'} (and 'overrides'). With
    `raw`, the experiment's own result is appended to it (for `compare_runs`).
  """
  result, where = _evaluate(workdir, checkpoint, overrides)
  checked = experiment_lib.check_eval_result(result)
  directory, step = where['directory'], where['step']
  checkpoint_dir = os.path.join(directory, str(step))
  out = out or os.path.join(os.path.dirname(directory), 'eval',
                            f'{os.path.basename(directory)}_{step}')
  summary = {'checkpoint': checkpoint_dir, 'step': step, 'metrics': checked.metrics}
  if overrides:
    summary['overrides'] = list(overrides)
  _write(out, summary, checked.figures, 'metrics.json')
  print(f'{checkpoint_dir} (step {step})\n{metric_writer.format_table(checked.metrics)}\n'
        f'Wrote {os.path.join(out, "metrics.json")} and {len(checked.figures)} figure(s).\n')
  if raw is not None:
    raw.append((result, where['config']))
  return summary


def comparison_table(metrics: dict[str, dict[str, float]]) -> str:
  """A Markdown table: a row per metric (every run's union, sorted), a column per run."""
  names = list(metrics)
  rows = sorted(set().union(*(m.keys() for m in metrics.values())))
  lines = ['| metric | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  for row in rows:
    values = [f'{metrics[n][row]:.4g}' if row in metrics[n] else '-' for n in names]
    lines.append(f'| {row} | ' + ' | '.join(values) + ' |')
  return '\n'.join(lines)


def _run_names(workdirs: list[str], names: list[str]) -> list[str]:
  names = list(names) or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs) or len(set(names)) != len(names):
    raise config_utils.ConfigError(
        f'--name: give one distinct name per --workdir ({len(workdirs)}), got {names}; runs in '
        'folders of the same name need --name')
  return names


def compare_runs(workdirs: list[str], checkpoint: str = 'best', out: str | None = None,
                 overrides: list[str] = (), names: list[str] = ()) -> dict[str, Any]:
  """Evaluates several runs (each as `evaluate_checkpoint`) and puts them side by side in `out`.

  Returns:
    The content of comparison.json: {'runs': {name: metrics.json content}}.
  """
  names = _run_names(workdirs, names)
  raw, summaries = [], {}
  for name, workdir in zip(names, workdirs):
    summaries[name] = evaluate_checkpoint(workdir, checkpoint, overrides=overrides, raw=raw)
  out = out or os.path.join(os.path.commonpath([os.path.abspath(w) for w in workdirs]),
                            'comparison')
  packages = {models.for_experiment(config.experiment) for _, config in raw}
  figures = {}
  if len(packages) == 1 and hasattr(next(iter(packages)), 'compare_figures'):
    figures = next(iter(packages)).compare_figures(
        {name: result for name, (result, _) in zip(names, raw)})
  table = comparison_table({name: s['metrics'] for name, s in summaries.items()})
  _write(out, {'runs': summaries}, figures, 'comparison.json')
  files.write_text(os.path.join(out, 'comparison.md'), table + '\n')
  print(f'{table}\nWrote {os.path.join(out, "comparison.json")}, comparison.md and '
        f'{len(figures)} figure(s).')
  return {'runs': summaries}


def evaluate_ensemble(workdirs: list[str], checkpoint: str = 'best', out: str | None = None,
                      overrides: list[str] = (), names: list[str] = ()) -> dict[str, Any]:
  """Evaluates the runs as the members of one ensemble (`evaluate_ensemble` of their package).

  Every member's checkpoint and config are checked before anything is evaluated.

  Returns:
    The content of ensemble.json: {'members': {name: {'checkpoint', 'metrics'}},
    'ensemble': {column name: metrics}} (and 'overrides').
  """
  names = _run_names(workdirs, names)
  step_dirs = [os.path.join(*map(str, checkpointing.find_checkpoint(w, checkpoint)))
               for w in workdirs]
  configs = [config_utils.from_json_dict(checkpoint_reading.read_config(d)) for d in step_dirs]
  packages = {models.for_experiment(c.experiment) for c in configs}
  if len(packages) != 1:
    raise models.ModelPackageError(
        '--ensemble: the runs belong to different model packages '
        f'({", ".join(sorted(p.__name__ for p in packages))}); members must be of one package')
  evaluate = models.function(next(iter(packages)), 'evaluate_ensemble',
                             'ensemble evaluation (--ensemble)')
  config = configs[0]
  apply_overrides(config, list(overrides))
  member_metrics, ensemble_metrics = evaluate(step_dirs, config)
  columns = {name: dict(m) for name, m in zip(names, member_metrics)}
  combined = {f'{rule} of {len(workdirs)}': dict(m) for rule, m in ensemble_metrics.items()}
  clash = sorted(set(columns) & set(combined))
  if clash:
    raise config_utils.ConfigError(f'--name: {clash} is also the name of an ensemble column')
  summary = {'members': {name: {'checkpoint': d, 'metrics': columns[name]}
                         for name, d in zip(names, step_dirs)},
             'ensemble': combined}
  if overrides:
    summary['overrides'] = list(overrides)
  out = out or os.path.join(os.path.commonpath([os.path.abspath(w) for w in workdirs]),
                            'ensemble')
  table = comparison_table({**columns, **combined})
  _write(out, summary, {}, 'ensemble.json')
  files.write_text(os.path.join(out, 'ensemble.md'), table + '\n')
  print(f'{table}\nWrote {os.path.join(out, "ensemble.json")} and ensemble.md.')
  return summary


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_multi_string('workdir', None, 'Run folder (holds checkpoints/ and best/); '
                            'repeat it to compare runs.')
  flags.DEFINE_multi_string('name', [], 'With several --workdir: the runs\' names, in order.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', a step number or a step directory.")
  flags.DEFINE_string('out', None, 'Output folder for metrics.json and the figures.')
  flags.DEFINE_bool('ensemble', False, 'With several --workdir: evaluate them as one ensemble '
                    '(each member and the ensemble in one table).')
  flags.DEFINE_multi_string('set', [], 'KEY=VALUE: change a key of the saved config (repeatable).')
  flags.DEFINE_integer('outline_every', None, 'Renamed: use --set=plot_outline_every=N.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.outline_every is not None:
    raise app.UsageError('--outline_every was renamed: frame outlines are a setting of the '
                         'DualTrack configs now, --set=plot_outline_every=N')
  workdirs = f.workdir or []
  if not workdirs and not os.path.isdir(f.checkpoint):
    raise app.UsageError('--workdir is required unless --checkpoint is a step directory')
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  if f.ensemble:
    if len(workdirs) < 2:
      raise app.UsageError('--ensemble needs two or more --workdir (the members)')
    evaluate_ensemble(workdirs, f.checkpoint, f.out, f.set, f.name)
  elif len(workdirs) > 1:
    compare_runs(workdirs, f.checkpoint, f.out, f.set, f.name)
  else:
    evaluate_checkpoint(workdirs[0] if workdirs else None, f.checkpoint, f.out, f.set)


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.evaluate')
