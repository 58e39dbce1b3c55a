"""Tests of launch/evaluate.py (CLI and in-process) on the toy model package."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

from launch import config_utils
from launch import evaluate
from launch import metric_writer
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
  assert tags.get('eval/errors/toy_0') == 'image'
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
      'errors_toy_0.png', 'errors_toy_1.png']
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
  table = metric_writer.format_table({'b/long_metric_name': 2.5, 'a': 1e-3})
  assert table.splitlines() == ['metric              value',
                                '------------------  ------------',
                                'a                   0.001',
                                'b/long_metric_name  2.5']


def test_set_overrides_the_saved_config(trained, tmp_path):
  workdir, _ = trained
  # Another validation set: more and longer sweeps give other metrics from the same variables.
  base = evaluate.evaluate_checkpoint(workdir, 'best', out=str(tmp_path / 'a'))
  more = evaluate.evaluate_checkpoint(workdir, 'best', out=str(tmp_path / 'b'),
                                      overrides=['toy.num_val_sweeps=3'])
  assert more['overrides'] == ['toy.num_val_sweeps=3']
  assert more['metrics']['mse'] != base['metrics']['mse']
  assert len([f for f in os.listdir(tmp_path / 'b') if f.endswith('.png')]) == 3
  with pytest.raises(config_utils.ConfigError, match="unknown config key 'toy.num_val'.*Did you "
                                                       'mean: toy.num_val_sweeps'):
    evaluate.evaluate_checkpoint(workdir, 'best', overrides=['toy.num_val=3'])
  with pytest.raises(config_utils.ConfigError, match='--set=seed: expected KEY=VALUE'):
    evaluate.evaluate_checkpoint(workdir, 'best', overrides=['seed'])
  with pytest.raises(config_utils.ConfigError, match='--set=seed=abc'):
    evaluate.evaluate_checkpoint(workdir, 'best', overrides=['seed=abc'])


def test_runs_side_by_side(trained, tmp_path):
  workdir, _ = trained
  out = str(tmp_path / 'comparison')
  summary = evaluate.compare_runs([workdir, workdir], out=out, names=['first', 'second'])
  first, second = summary['runs']['first'], summary['runs']['second']
  assert first['metrics'] == second['metrics'] and first['step'] == 12
  with open(os.path.join(out, 'comparison.md')) as f:
    table = f.read().splitlines()
  assert table[0] == '| metric | first | second |'
  mse = f"{first['metrics']['mse']:.4g}"
  assert f'| mse | {mse} | {mse} |' in table
  with pytest.raises(config_utils.ConfigError, match='one distinct name per --workdir'):
    evaluate.compare_runs([workdir, workdir], out=out)
