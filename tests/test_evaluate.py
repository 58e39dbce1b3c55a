"""Tests of launch/evaluate.py (CLI and in-process) and launch/plots.py."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from launch import evaluate
from launch import plots
from launch import trainer
import toy_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 12-step toy run (checkpoints at 8 and 12, evaluation at 12) and its final eval metrics."""
  base = tmp_path_factory.mktemp('evaluate')
  config = toy_experiment.get_config()
  config.data_file = toy_experiment.write_teacher(str(base / 'teacher.npz'))
  config.total_steps = 12
  workdir = str(base / 'run')
  metrics = trainer.train_and_evaluate(config, workdir)
  return workdir, metrics


def _event_tags(workdir):
  """{tag: kind} of the TensorBoard event file(s) (TFRecord framing: length, crc, data, crc)."""
  tags = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      while header := f.read(12):
        (length,) = struct.unpack('<Q', header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        for value in event.summary.value:
          tags[value.tag] = value.WhichOneof('value')
  return tags


def test_training_logs_to_tensorboard(trained):
  tags = _event_tags(trained[0])
  for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'train/steps_per_sec', 'eval/mse'):
    assert tags.get(tag) == 'simple_value', tag
  assert tags.get('eval/trajectory/toy_0') == 'image'
  assert any(tag.startswith('config') for tag in tags)


def test_cli_evaluates_best_checkpoint(trained):
  workdir, train_metrics = trained
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, 'tests'), ROOT]))
  result = subprocess.run([sys.executable, '-m', 'launch.evaluate', f'--workdir={workdir}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr
  out = os.path.join(workdir, 'eval', 'best_12')
  with open(os.path.join(out, 'metrics.json')) as f:
    summary = json.load(f)
  assert summary['step'] == 12
  assert summary['checkpoint'] == os.path.join(workdir, 'best', '12')
  # The restored variables give the metrics that training computed at that step.
  assert summary['metrics']['mse'] == pytest.approx(train_metrics['mse'], rel=1e-5)
  assert summary['metrics']['rmse'] == pytest.approx(train_metrics['mse'] ** 0.5, rel=1e-5)
  assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == [
      'trajectory_toy_0.png', 'trajectory_toy_1.png']
  assert 'metric  value' in result.stdout and 'mse' in result.stdout


def test_evaluate_step_directory_and_latest(trained, tmp_path):
  workdir, _ = trained
  by_path = evaluate.evaluate_checkpoint(None, os.path.join(workdir, 'checkpoints', '8'),
                                         out=str(tmp_path / 'a'))
  assert by_path['step'] == 8
  latest = evaluate.evaluate_checkpoint(workdir, 'latest', out=str(tmp_path / 'b'))
  assert latest['step'] == 12
  # Step 8 and step 12 are different parameters.
  assert by_path['metrics']['mse'] != latest['metrics']['mse']
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 9'):
    evaluate.evaluate_checkpoint(workdir, '9')
  with pytest.raises(ValueError, match="--checkpoint must be 'best', 'latest'"):
    evaluate.evaluate_checkpoint(workdir, 'newest')


def test_format_table():
  table = evaluate.format_table({'b/long_metric_name': 2.5, 'a': 1e-3})
  assert table.splitlines() == ['metric              value',
                                '------------------  ------------',
                                'a                   0.001',
                                'b/long_metric_name  2.5']


def _pose(angle_deg, translation):
  a = np.deg2rad(angle_deg)
  g = np.eye(4)
  g[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
  g[:3, 3] = translation
  return g


def test_trajectory_points_use_image_centre_and_corners():
  g = np.stack([np.eye(4), _pose(90, [10, 0, 5])])
  pixel_to_image = np.diag([0.5, 0.25, 1.0, 1.0])  # 0.5 mm per column, 0.25 mm per row
  points = plots.trajectory_points(g, pixel_to_image, image_shape=(40, 20))  # H=40, W=20
  assert points.shape == (2, 5, 3)
  # Frame 0: centre at (W/2 * 0.5, H/2 * 0.25) = (5, 5); corner (W, 0) at (10, 0).
  np.testing.assert_allclose(points[0, 0], [5, 5, 0])
  np.testing.assert_allclose(points[0, 2], [10, 0, 0])
  # Frame 1 rotates by 90 degrees about z, then translates: (x, y) -> (-y + 10, x).
  np.testing.assert_allclose(points[1, 0], [5, 5, 5], atol=1e-12)
  np.testing.assert_allclose(points[1, 2], [10, 10, 5], atol=1e-12)
  # Without calibration: the frame origins.
  np.testing.assert_allclose(plots.trajectory_points(g)[:, 0], [[0, 0, 0], [10, 0, 5]])


def test_trajectory_figure_renders():
  steps = np.cumsum(np.ones((5, 3)), axis=0)
  gt = np.tile(np.eye(4), (5, 1, 1))
  gt[:, :3, 3] = steps
  pred = gt.copy()
  pred[:, 0, 3] *= 1.5
  fig = plots.trajectory_figure(pred, gt, title='sweep 1', pixel_to_image=np.eye(4),
                                image_shape=(4, 6), outline_every=2)
  image = plots.figure_to_array(fig)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert len(fig.axes) == 3 and fig.axes[1].get_xlabel() == 'x (mm)'
  assert fig.axes[1].get_ylabel() == 'z (mm)'
  # Both trajectories and their start markers, plus 3 outlines each (frames 0, 2, 4).
  assert len(fig.axes[0].lines) == 2 * (2 + 3)
  assert image.std() > 0  # not blank
  assert plots.safe_filename('tus-rec/000 a b') == 'tus-rec_000_a_b'
