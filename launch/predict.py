r"""Predicts on real files: `python -m launch.predict --checkpoint=RUN [INPUT ...] [options]`.

The run's model package (found from its config, launch/models.py) says which inputs and options
it takes and what it writes; `--help` lists every registered package's options. Today:

  DualTrack, sweeps (`dualtrack_jax/predict.py`): `OUT/<sweep_id>/` gets poses.h5, trajectory.png,
  the reconstructed volume (NIfTI or h5), slices.png and, when the file has tracking, metrics.json
    python -m launch.predict --checkpoint=workdirs/local_stage1_sim --sweep=a.h5 --sweep=b.h5
    python -m launch.predict --checkpoint=workdirs/local_stage1_sim --dataset=tus-rec --split=val
  SONICHU, images (`sonichu_jax/predict.py`): keypoints and measurements printed; OUT gets
  <image>_<task>.png (overlay) and .json
    python -m launch.predict scan.png --task=fetal_femur --checkpoint=workdirs/sonichu_sim

--checkpoint: a run folder (its best checkpoint, else its latest) or a step folder
  (`.../checkpoints/1200`, `.../best/900`).
--out: default `<run folder>/predict/<checkpoints|best>_<step>`.

Every input is checked before any prediction. Each output unit is written into a temporary folder
and published when complete (a folder renamed onto `OUT/<name>`, replacing an earlier result, or
its files moved into OUT one by one), so a crash never leaves a result that looks complete.
"""
from collections.abc import Callable, Sequence
import os
import shutil
import tempfile
import uuid

from absl import flags

from launch import experiment as experiment_lib
from launch import metric_writer
from launch import models
from launch import plots
from launch import xla_flags
from ultrasound_common import errors

_LAYOUTS = ('folders', 'files')


def default_out(run: experiment_lib.Run) -> str:
  return os.path.join(run.run_dir, 'predict', '_'.join(run.checkpoint_dir.split(os.sep)[-2:]))


def _replace_dir(src: str, dst: str) -> None:
  """Renames the finished folder `src` onto `dst`, moving an earlier `dst` aside first."""
  old = None
  if os.path.exists(dst):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=os.path.dirname(dst))
    os.rename(dst, os.path.join(old, 'result'))
  os.rename(src, dst)
  if old is not None:
    shutil.rmtree(old)


def publish(units: Sequence[tuple[str, Callable]], out: str, layout: str = 'folders'
            ) -> dict[str, dict[str, float]]:
  """Writes every (name, write) unit of a package's plan into `out`; returns {name: metrics}.

  Names are made safe as file names and must stay distinct. `write(folder, name)` fills an empty
  temporary folder and returns (text, metrics); the text and the metrics' table are printed.
  """
  if layout not in _LAYOUTS:
    raise errors.InputError(f'PREDICTION_LAYOUT must be one of {_LAYOUTS}, got {layout!r}')
  safe = {}
  for name, _ in units:
    key = plots.safe_filename(name)
    if key in safe:
      raise errors.InputError(
          f'inputs {safe[key]!r} and {name!r} would both write {key!r} in {out}; '
          'rename one of them')
    safe[key] = name
  os.makedirs(out, exist_ok=True)
  results = {}
  for (name, write), key in zip(units, safe):
    final = os.path.join(out, key)
    # os.mkdir, not tempfile.mkdtemp: the result keeps the umask's permissions, not 0700.
    tmp = os.path.join(out, f'.{key}.tmp-{uuid.uuid4().hex[:12]}')
    os.mkdir(tmp)
    try:
      text, metrics = write(tmp, key)
      if layout == 'folders':
        _replace_dir(tmp, final)
        written = final
      else:
        files = sorted(os.listdir(tmp))
        for file in files:
          os.replace(os.path.join(tmp, file), os.path.join(out, file))
        written = ', '.join(os.path.join(out, f) for f in files)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    table = f'\n{metric_writer.format_table(metrics)}' if metrics else ''
    print(f'{text}{table}\nWrote {written}\n', flush=True)
    results[name] = dict(metrics)
  return results


def predict(checkpoint: str, inputs: Sequence[str], out: str | None = None,
            flag_values=flags.FLAGS) -> dict[str, dict[str, float]]:
  """Restores `checkpoint`, plans with its package and publishes every output unit."""
  run = experiment_lib.restore_run(checkpoint)
  package = models.for_experiment(run.config.experiment)
  plan = models.function(package, 'plan_predictions', 'predictions from files')
  units = plan(run, list(inputs), flag_values)
  return publish(units, out or default_out(run), getattr(package, 'PREDICTION_LAYOUT', 'folders'))


def define_flags() -> None:
  """Registers the flags, the packages' too (only when run as a program: importing is side-free)."""
  flags.DEFINE_string('checkpoint', None, 'Run folder (best, else latest) or step folder.',
                      required=True)
  flags.DEFINE_string('out', None,
                      'Output folder (default <run>/predict/<best|checkpoints>_<step>).')
  for package in models.interfaces().values():
    if hasattr(package, 'define_predict_flags'):
      package.define_predict_flags()


def main(argv: list[str]) -> None:
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  predict(flags.FLAGS.checkpoint, argv[1:], flags.FLAGS.out)


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.predict')
