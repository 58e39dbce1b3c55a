"""The runtime names no model: its registry (launch/models.py) and a third model package.

The toy model package (tests/toy_experiment.py, registered as `toy` by the dist-info folder beside
it) goes through every command line that a run or a registered name reaches: train, evaluate,
predict and benchmark (export: tests/test_export.py), without a line of launch/ naming it.
"""
import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import models
import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
MODEL_PACKAGES = ('dualtrack_jax', 'sonichu_jax', 'toy_experiment')


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([TESTS, ROOT, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = cpu_env.xla_flags(1)
  return env


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)


def test_launch_imports_no_model_package():
  for path in sorted(glob.glob(os.path.join(ROOT, 'launch', '*.py'))):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or '']
      else:
        continue
      assert not [n for n in names if n.split('.')[0] in MODEL_PACKAGES], (path, node.lineno)


def test_importing_the_library_changes_nothing():
  code = ('import os, sys\n'
          "before = os.environ.get('XLA_FLAGS')\n"
          'from launch import benchmark, convert, evaluate, predict, train, trainer\n'
          'import dualtrack_jax.interface, sonichu_jax.interface\n'
          'from absl import flags\n'
          "assert os.environ.get('XLA_FLAGS') == before, os.environ.get('XLA_FLAGS')\n"
          "assert not [n for n in ('checkpoint', 'bench', 'sweep', 'task') if n in flags.FLAGS]\n")
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def test_registry_finds_packages_by_experiment_and_by_name():
  assert {'dualtrack', 'sonichu', 'toy'} <= set(models.interfaces())
  assert models.for_experiment('dualtrack_jax.experiments.fusion').__name__ == (
      'dualtrack_jax.interface')
  assert models.for_experiment('toy_experiment').__name__ == 'toy_experiment'
  package, _ = models.lookup('CONVERTERS', 'sonichu', '--model')
  assert package.__name__ == 'sonichu_jax.interface'
  with pytest.raises(models.ModelPackageError,
                     match="config.experiment 'mine.experiments.x': no registered model package "
                           "holds 'mine' .*ultrasound_jax.models"):
    models.for_experiment('mine.experiments.x')
  with pytest.raises(models.ModelPackageError,
                     match="--bench='gpu': unknown; known: ensemble, pipeline, simulator"):
    models.lookup('BENCHMARKS', 'gpu', '--bench')
  with pytest.raises(models.ModelPackageError,
                     match='model package toy_experiment does not offer conversions'):
    models.function(models.interfaces()['toy'], 'from_torch', 'conversions')


def test_a_name_offered_twice_is_refused(monkeypatch):
  toy = models.interfaces()['toy']
  monkeypatch.setattr(toy, 'BENCHMARKS', {'simulator': print}, raising=False)
  with pytest.raises(models.ModelPackageError,
                     match="BENCHMARKS: 'simulator' is defined by both"):
    models.named('BENCHMARKS')


@pytest.mark.slow
def test_toy_package_through_every_command(tmp_path):
  teacher = str(tmp_path / 'teacher.npz')
  np.savez(teacher, kernel=np.random.default_rng(0).standard_normal((3, 3, 1, 3)))
  workdir = str(tmp_path / 'run')
  result = _run('launch.train', f'--config={TESTS}/toy_experiment.py', f'--workdir={workdir}',
                f'--config.data_file={teacher}', '--config.total_steps=4',
                '--config.eval_every_steps=4', '--config.batch_size=8')
  assert result.returncode == 0, result.stderr[-3000:]

  result = _run('launch.evaluate', f'--workdir={workdir}', f'--out={tmp_path / "eval"}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'eval')) == ['errors_toy_0.png', 'errors_toy_1.png',
                                                   'metrics.json']
  result = _run('launch.evaluate', f'--workdir={workdir}', '--outline_every=4')
  assert result.returncode == 1 and '--set=plot_outline_every=N' in result.stderr

  images = [str(tmp_path / f'{name}.npy') for name in ('a', 'b')]
  for i, path in enumerate(images):
    np.save(path, np.full((8, 8), float(i), np.float32))
  out = tmp_path / 'predict'
  result = _run('launch.predict', *images, f'--checkpoint={workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['a', 'b']
  with open(out / 'b' / 'prediction.json') as f:
    prediction = json.load(f)
  assert prediction['input'] == images[1] and len(prediction['prediction']) == 3
  assert 'output_mean' in result.stdout and f'Wrote {out / "a"}' in result.stdout
  np.save(tmp_path / 'wrong.npy', np.zeros((8, 9), np.float32))
  result = _run('launch.predict', str(tmp_path / 'wrong.npy'), f'--checkpoint={workdir}')
  assert result.returncode == 1 and 'expected an (8, 8) image' in result.stderr
  assert 'Traceback' not in result.stderr

  result = _run('launch.benchmark', '--bench=inference', '--model=toy', '--frames=2,3',
                '--dtype=float32,bfloat16', '--steps=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'toy, batch 2' in result.stdout and 'toy, batch 3' in result.stdout
  assert result.stdout.count('| jax float32 |') == result.stdout.count('| jax bfloat16 |') == 2
  result = _run('launch.benchmark', '--bench=inference', '--model=resnet')
  assert result.returncode == 1
  assert "--model='resnet': unknown; known: baseline_dclnet," in result.stderr
  assert 'dualtrack, sonichu, toy' in result.stderr
