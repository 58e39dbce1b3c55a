"""Ensembles of SONICHU keypoint models (sonichu_jax/ensemble.py) and `launch.evaluate --ensemble`.

Three tiny runs with random variables (no training): the vmapped members must equal each member
run on its own, the median and spread their definitions, `launch.evaluate --ensemble` must give
each member the metrics that its own evaluation gives and the median's; bad members must fail
before anything runs, naming the file and the config key.
"""
import json
import os

import jax
import numpy as np
import pytest

import tiny_runs
import toy_experiment
from launch import config_utils
from launch import evaluate
from launch import models
from sonichu_jax import ensemble
from sonichu_jax import tasks
from sonichu_jax.experiments import keypoints
from ultrasound_common import checkpoints


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(base folder, [three run folders of one tiny architecture])."""
  base = tmp_path_factory.mktemp('ensemble')
  cache = str(base / 'cache')
  return base, [tiny_runs.sonichu_run(str(base / f'member{i}'), i, cache)[1] for i in range(3)]


@pytest.fixture(scope='module')
def members(runs):
  return ensemble.load_members(runs[1])


def test_vmapped_members_equal_each_member_alone(runs, members):
  images = np.random.default_rng(0).normal(size=(2, 256, 256, 3)).astype(np.float32)
  task_index = tasks.TASK_NAMES.index('HC')
  preds = np.asarray(ensemble.jit_member_predictions(members.experiment, tta=True)(
      members.variables, images, task_index))
  assert preds.shape == (3, 2, keypoints.MAX_KEYPOINTS, 2)
  experiment = keypoints.Experiment(members.config, load_data=False)
  alone = np.stack([experiment.padded_keypoints(checkpoints.read_variables(run), images,
                                                task_index, tta=True) for run in runs[1]])
  np.testing.assert_allclose(preds, alone, atol=1e-6)
  sequential = ensemble.jit_member_predictions(members.experiment, tta=True, sequential=True)
  np.testing.assert_allclose(sequential(members.variables, images, task_index), alone, atol=1e-6)
  # Random members nearly agree; the median still has to be the middle one per coordinate.
  assert np.all(np.ptp(alone[..., :4, :], axis=0) > 0)
  np.testing.assert_allclose(ensemble.median(preds), np.median(alone, axis=0), atol=1e-6)
  assert len(set(members.hashes)) == 3
  assert members.paths == tuple(os.path.join(run, 'best', '7') for run in runs[1])


def test_median_and_spread_by_hand():
  preds = np.zeros((3, 1, 2, 2), np.float32)
  preds[:, 0, 0] = [[0.1, 0.9], [0.2, 0.1], [0.4, 0.5]]  # Median (0.2, 0.5): no member's point.
  np.testing.assert_allclose(ensemble.median(preds)[0, 0], [0.2, 0.5], atol=1e-7)
  wh = np.array([[100.0, 10.0]])
  distances = np.hypot((preds[:, 0, 0, 0] - 0.2) * 100, (preds[:, 0, 0, 1] - 0.5) * 10)
  np.testing.assert_allclose(ensemble.spread(preds, wh)[0], [distances.mean(), 0.0], rtol=1e-5)
  assert float(ensemble.spread(preds[:1])[0, 0]) == 0.0


def test_bf16_members_store_and_compute_in_bf16(runs):
  bf16 = ensemble.load_members(runs[1][:2], dtype='bfloat16')
  assert bf16.experiment.model.dtype == np.dtype('bfloat16')
  assert {x.dtype for x in jax.tree.leaves(bf16.variables['params'])} == {np.dtype('bfloat16')}


@pytest.mark.slow
def test_evaluate_ensemble_table(runs, tmp_path):
  base, workdirs = runs
  out = str(tmp_path / 'ensemble')
  summary = evaluate.evaluate_ensemble(workdirs, out=out, names=['a', 'b', 'c'])
  assert list(summary['members']) == ['a', 'b', 'c']
  assert list(summary['ensemble']) == ['median of 3']
  # Each member's column is what its own evaluation gives (the ordinary, one-model path).
  single = evaluate.evaluate_checkpoint(workdirs[1], out=str(tmp_path / 'single'))
  for key in ('mre/weighted', 'mre/unweighted', 'mre/HC', 'mre/fetal_femur'):
    assert summary['members']['b']['metrics'][key] == pytest.approx(single['metrics'][key],
                                                                    rel=1e-5)
  median = summary['ensemble']['median of 3']
  assert set(median) >= {'mre/weighted', 'mre/unweighted', 'mre/HC', 'mre/fetal_femur'}
  with open(os.path.join(out, 'ensemble.json')) as f:
    assert json.load(f)['ensemble'] == summary['ensemble']
  with open(os.path.join(out, 'ensemble.md')) as f:
    header, _, *rows = f.read().splitlines()
  assert header == '| metric | a | b | c | median of 3 |'
  assert any(row.startswith('| mre/unweighted |') for row in rows)


def test_member_of_another_architecture_is_refused(runs):
  base, workdirs = runs
  _, other = tiny_runs.sonichu_run(str(base / 'wide'), 5, str(base / 'cache'), embed_dim=32)
  with pytest.raises(ensemble.MemberError, match=r'wide/best/7: config\.model\.embed_dim is 32'):
    ensemble.load_members([workdirs[0], other])
  # Stochastic depth is off in inference: members may differ in it.
  _, regularised = tiny_runs.sonichu_run(str(base / 'drop_path'), 6, str(base / 'cache'),
                                         drop_path_rate=0.2)
  assert ensemble.load_members([workdirs[0], regularised]).size == 2


def test_member_of_another_task_set_is_refused(runs, tmp_path):
  base, workdirs = runs
  config = config_utils.from_json_dict(checkpoints.read_config(workdirs[0]))
  config.data.tasks = ('HC',)
  other = tiny_runs.save_run(str(tmp_path / 'hc_only'), config,
                             checkpoints.read_variables(workdirs[0]))
  with pytest.raises(ensemble.MemberError,
                     match=r"hc_only/best/7: config\.data\.tasks is \['HC'\]"):
    ensemble.load_members([workdirs[0], other])


def test_missing_member_is_refused(runs, tmp_path):
  workdirs = runs[1]
  with pytest.raises(ensemble.MemberError, match='nowhere: no such run folder'):
    ensemble.load_members([workdirs[0], str(tmp_path / 'nowhere')])
  os.makedirs(tmp_path / 'empty_run')
  with pytest.raises(ensemble.MemberError, match='empty_run: no checkpoint'):
    ensemble.load_members([workdirs[0], str(tmp_path / 'empty_run')])
  with pytest.raises(ensemble.MemberError, match='at least one member'):
    ensemble.load_members([])


def test_package_without_ensemble_hook_is_refused(tmp_path):
  """The tests' toy model package has no evaluate_ensemble."""
  config = toy_experiment.get_config()
  config.data_file = toy_experiment.write_teacher(str(tmp_path / 'teacher.npz'))
  experiment = toy_experiment.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'image': np.zeros((1, 8, 8, 1), np.float32)})
  workdirs = [tiny_runs.save_run(str(tmp_path / f'toy{i}'), config,
                                 tiny_runs.random_variables(shapes, i)) for i in range(2)]
  with pytest.raises(models.ModelPackageError, match='does not offer ensemble evaluation'):
    evaluate.evaluate_ensemble(workdirs)
