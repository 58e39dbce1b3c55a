"""End to end through the command lines: SONICHU's `:sim` config trains, evaluates and predicts.

A tiny version of the `:sim` recipe (one-block ViT, two training steps on a few synthetic images of
two tasks) runs `launch.train` in a subprocess; `launch.evaluate` must print the metrics table with
the mean-keypoints baseline, and `launch.predict IMAGE --task=...` must print the keypoints in
pixels and the measurement and write the overlay, whose printed keypoints are checked against the
JSON it writes and the measurement against the keypoints.
"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from sonichu_jax.data import synthetic
import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'sonichu', 'keypoints.py')
TINY = ('--config.data.synthetic.num_train=2', '--config.data.synthetic.num_val=1',
        "--config.data.tasks=('fetal_femur','HC')", '--config.model.embed_dim=16',
        '--config.model.depth=1', '--config.model.num_heads=2', '--config.model.head_filters=8',
        '--config.batch_size=2', '--config.eval_batch_size=2', '--config.total_steps=2',
        '--config.warmup_epochs=0.0', '--config.checkpoint_every_steps=2')


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([ROOT, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = cpu_env.xla_flags(1)
  return env


def _run(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  base = tmp_path_factory.mktemp('sonichu_cli')
  workdir = str(base / 'run')
  result = _run('launch.train', f'--config={CONFIG}:sim', f'--workdir={workdir}',
                f'--config.data.synthetic.cache_dir={base / "cache"}', *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, base


@pytest.mark.slow
def test_train_then_evaluate_prints_the_table(run):
  workdir, _ = run
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  result = _run('launch.evaluate', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  for key in ('mre/weighted', 'mre/unweighted', 'mre/fetal_femur', 'mre/HC', 'sdr@10px/all',
              'biometry/HC/HC_mae', 'baseline/mean_keypoints/mre/weighted'):
    assert f'\n{key} ' in result.stdout, key
  with open(os.path.join(workdir, 'eval', 'best_2', 'metrics.json')) as f:
    summary = json.load(f)
  assert summary['step'] == 2 and np.isfinite(summary['metrics']['mre/weighted'])


@pytest.mark.slow
def test_predict_prints_keypoints_and_measurement_and_writes_overlay(run):
  workdir, base = run
  image = synthetic.generate('fetal_femur', 11)['image']
  path = str(base / 'femur.png')
  Image.fromarray(np.stack([image] * 3, axis=-1)).save(path)  # RGB input becomes gray.
  out = str(base / 'predict')
  result = _run('launch.predict', path, '--task=fetal_femur', f'--checkpoint={workdir}',
                f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['femur_fetal_femur.json', 'femur_fetal_femur.png']
  with open(os.path.join(out, 'femur_fetal_femur.json')) as f:
    summary = json.load(f)
  points = np.array(summary['keypoints_px'])
  assert points.shape == (2, 2) and summary['image_hw'] == list(image.shape)
  for x, y in points:
    assert f'{x:9.2f}  {y:9.2f}' in result.stdout
  fl = summary['measurements']['FL']
  assert fl == pytest.approx(float(np.linalg.norm(points[0] - points[1])))
  assert f'FL: {fl:.2f} pixels' in result.stdout
  with Image.open(os.path.join(out, 'femur_fetal_femur.png')) as overlay:
    assert overlay.size[0] >= 300
  # Errors name what is wrong, without a traceback.
  result = _run('launch.predict', path, '--task=femur', f'--checkpoint={workdir}')
  assert result.returncode == 1 and "Unknown SONICHU task 'femur'" in result.stderr
  assert 'Traceback' not in result.stderr
  missing = str(base / 'missing.png')
  result = _run('launch.predict', missing, '--task=HC', f'--checkpoint={workdir}')
  assert result.returncode == 1 and f'{missing}: cannot read the image' in result.stderr
