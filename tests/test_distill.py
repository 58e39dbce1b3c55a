"""Tests of SONICHU distillation (sonichu_jax/experiments/distill.py) on tiny shapes.

The teacher term must be the loss towards the coordinate-wise median of the teachers run one by
one; the teachers must stay out of the train state (so out of every checkpoint) and be recorded in
the config; bad teachers must fail before the dataset is read. Training through the trainer,
checkpoints and resume: tests/test_sonichu_chain.py.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch import config_utils
from launch import trainer
from sonichu_jax import ensemble
from sonichu_jax import tasks
from sonichu_jax.experiments import distill
from sonichu_jax.experiments import keypoints
from tests import tiny_runs
from ultrasound_common import checkpoints
from ultrasound_common import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'sonichu', 'distill.py')
TASKS = ('HC', 'fetal_femur')
NUM_TEACHERS = 3


def tiny_config(cache_dir, teachers=()):
  """distill.py:sim at tiny sizes: a 1-block ViT of width 16 on two tasks of 2 images each."""
  config = config_utils.load_config_file(f'{CONFIG}:sim')
  config.data.synthetic.cache_dir = str(cache_dir)
  config.data.synthetic.num_train = 2
  config.data.synthetic.num_val = 2
  config.data.tasks = TASKS
  config.model.embed_dim = 16
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.head_filters = 8
  config.batch_size = 2
  config.eval_batch_size = 2
  config.teachers.workdirs = tuple(str(t) for t in teachers)
  return config


def _model_shapes(config):
  """The keypoint model's variable shapes (no data read)."""
  experiment = keypoints.Experiment(config, load_data=False)
  return jax.eval_shape(experiment.init, jax.random.key(0),
                        {'image': np.zeros((1, 256, 256, 3), np.float32)})


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Three teacher runs of random variables, the experiment distilling them and a batch."""
  root = tmp_path_factory.mktemp('distill')
  config = tiny_config(root / 'cache')
  shapes = _model_shapes(config)
  teachers = [tiny_runs.save_run(str(root / f'teacher{k}'), config,
                                 tiny_runs.random_variables(shapes, k))
              for k in range(NUM_TEACHERS)]
  config.teachers.workdirs = tuple(teachers)
  experiment = distill.Experiment(config)
  batch = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
  student = jax.tree.map(jnp.asarray, tiny_runs.random_variables(shapes, 10))
  return config, experiment, batch, student, teachers, shapes


def test_teacher_term_is_the_median_of_the_teachers_run_one_by_one(setup):
  config, experiment, batch, student, teachers, _ = setup

  def losses(variables, constants, batch, rng):
    # As the trainer calls it: the student's variables plus the step constants (the teachers).
    with_teachers = {**constants, **variables}
    loss, (step_metrics, _) = experiment.loss_fn(with_teachers, batch, rng)
    pred = experiment.supervised_terms(variables, batch, rng)[3]
    real = keypoints.Experiment.loss_fn(experiment, variables, batch, rng)[0]
    return loss, step_metrics, pred, experiment.teacher_targets(with_teachers, batch)[0], real

  loss, step_metrics, pred, stacked, real = jax.jit(losses)(
      student, experiment.step_constants(), batch, jax.random.key(0))
  # Each teacher alone: its own variables as saved, through the keypoint model's inference.
  one = keypoints.Experiment(config, load_data=False)
  predict = jax.jit(one.padded_keypoints)
  task = int(batch['task'][0])
  alone = np.stack([predict(checkpoints.read_variables(t), batch['image'], task)
                    for t in teachers])
  np.testing.assert_allclose(stacked, alone, rtol=1e-5, atol=1e-6)
  k = tasks.TASKS[task].num_keypoints
  assert np.ptp(alone[:, :, :k], axis=0).min() > 0  # The teachers disagree everywhere.
  median = np.median(alone, axis=0)
  # The l1 loss on normalised coordinates over the task's K keypoints of every row.
  want = np.mean(np.sum(np.abs(np.asarray(pred)[:, :k] - median[:, :k]), axis=-1))
  assert float(step_metrics['loss_teacher']) == pytest.approx(want, rel=1e-5)
  mean = np.mean(np.sum(np.abs(np.asarray(pred)[:, :k] - alone.mean(0)[:, :k]), axis=-1))
  assert abs(mean - want) > 1e-4 * want  # The test tells the median from the mean.
  assert float(loss) == pytest.approx(
      float(step_metrics['loss_real']) + 0.5 * want, rel=1e-5)
  # loss_real is the keypoint experiment's own loss.
  assert float(step_metrics['loss_real']) == pytest.approx(float(real), rel=1e-5)


def test_teachers_stay_out_of_the_train_state_and_are_recorded(setup):
  config, experiment, batch, _, teachers, shapes = setup
  tx = optax.adamw(1e-3)
  state = jax.eval_shape(lambda r, b: trainer.init_state(experiment, tx, r, b),
                         jax.random.key(0), batch)
  # The state the trainer checkpoints holds the student's variables and nothing else; the
  # teachers reach the step as its constants.
  assert jax.tree.structure(state['variables']) == jax.tree.structure(shapes)
  assert set(state) == {'step', 'rng', 'variables', 'opt_state'}
  constants = experiment.step_constants()
  assert list(constants) == ['teachers']
  assert jax.tree.structure(constants['teachers']) == jax.tree.structure(shapes)
  assert {x.shape[0] for x in jax.tree.leaves(constants['teachers'])} == {NUM_TEACHERS}
  # The config (saved with every checkpoint) names each teacher's checkpoint and weights.
  assert config.teachers.step_dirs == experiment.teachers.paths
  assert [os.path.dirname(os.path.dirname(p)) for p in config.teachers.step_dirs] == teachers
  assert config.teachers.sha256 == tuple(
      ensemble.variables_hash(checkpoints.read_variables(t)) for t in teachers)


def test_evaluate_adds_the_teachers_median_once(setup):
  _, experiment, _, student, _, _ = setup
  first = experiment.evaluate(student).metrics
  assert first['teachers/median/mre/weighted'] > 0
  assert {f'teachers/{i}/mre/unweighted' for i in range(NUM_TEACHERS)} <= set(first)
  assert 'mre/weighted' in first and 'baseline/mean_keypoints/mre/weighted' in first
  cached = experiment.teacher_metrics()
  assert experiment.teacher_metrics() is cached


def _saved_run(path, config):
  """A run folder whose checkpoint holds `config` (the variables are never read)."""
  return tiny_runs.save_run(str(path), config, {'params': {'x': np.zeros(1, np.float32)}})


def test_bad_teachers_fail_before_the_data_is_read(tmp_path):
  # The dataset does not exist: each teacher error must come first.
  broken = tiny_config(tmp_path / 'cache')
  broken.data.dataset = str(tmp_path / 'no_such_dataset')

  broken.teachers.workdirs = ()
  with pytest.raises(errors.InputError, match='config.teachers.workdirs is empty'):
    distill.Experiment(broken)

  missing = str(tmp_path / 'no_such_run')
  broken.teachers.workdirs = (_saved_run(tmp_path / 'good', tiny_config(tmp_path)), missing)
  with pytest.raises(errors.MissingFileError, match=f'config.teachers.workdirs: {missing}'):
    distill.Experiment(broken)

  wide = tiny_config(tmp_path / 'cache')
  wide.model.embed_dim = 32
  broken.teachers.workdirs = (_saved_run(tmp_path / 'wide', wide),)
  with pytest.raises(errors.InputError, match=r'wide/best/7 has config.model.embed_dim = 32, '
                                              r'but the student has 16'):
    distill.Experiment(broken)

  narrow = tiny_config(tmp_path / 'cache')
  narrow.data.tasks = ('HC',)
  broken.teachers.workdirs = (_saved_run(tmp_path / 'narrow', narrow),)
  with pytest.raises(errors.InputError, match=r"narrow/best/7 was trained on config.data.tasks "
                                              r"\['HC'\], without the student's tasks "
                                              r"\['fetal_femur'\]"):
    distill.Experiment(broken)

  # A teacher of another experiment altogether (an I-JEPA run has no config.model of heads...).
  alien = config_utils.load_config_file(os.path.join(ROOT, 'configs', 'sonichu',
                                                     'pretrain_ijepa.py') + ':sim')
  broken.teachers.workdirs = (_saved_run(tmp_path / 'alien', alien),)
  with pytest.raises(errors.InputError, match='alien/best/7 has config.model.'):
    distill.Experiment(broken)

  # Stochastic depth and the implementation choices are not architecture: such a teacher passes,
  # and the next thing read is the (missing) dataset.
  other = tiny_config(tmp_path / 'cache')
  other.model.update(drop_path_rate=0.3, attention_implementation='xla')
  broken.teachers.workdirs = (_saved_run(tmp_path / 'other', other),)
  with pytest.raises(errors.Error, match='no_such_dataset'):
    distill.Experiment(broken)

  # Prediction and export build the student alone: no teachers needed.
  assert distill.Experiment(broken, load_data=False).teachers is None


def test_changed_teachers_are_a_warning_and_recorded_anew(setup, caplog):
  config, experiment, *_ = setup
  again = tiny_config(config.data.synthetic.cache_dir, config.teachers.workdirs)
  again.teachers.sha256 = ('0' * 64,) * NUM_TEACHERS  # As if the checkpoint saw other teachers.
  with caplog.at_level('WARNING'):
    distill.Experiment(again)
  assert 'config.teachers.sha256: the teachers changed' in caplog.text
  assert again.teachers.sha256 == experiment.teachers.hashes
