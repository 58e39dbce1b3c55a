"""SONICHU's three stages chained at tiny sizes, checking what each hands to the next.

I-JEPA pretraining -> two teachers (keypoint runs from the pretrained encoder) -> pseudo-labels
from the teachers -> distillation of the teachers into a student trained on labels plus
pseudo-labels (resumed once) -> the teachers' ensemble and the student through `launch.evaluate`.
All in-process and a few steps each (a 1-block ViT of width 16 on two tasks): the point is the
plumbing, not the numbers.
"""
import json
import os

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from launch import checkpointing
from launch import config_utils
from launch import evaluate
from launch import sharding
from launch import trainer
from sonichu_jax import ensemble
from sonichu_jax import pseudo_label
from sonichu_jax.data import datasets
from sonichu_jax.data import fmuia
from sonichu_jax.data import synthetic
from ultrasound_common import checkpoints

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                       'sonichu')
TASKS = ('HC', 'fetal_femur')
TINY_MODEL = dict(embed_dim=16, depth=1, num_heads=2)
STEPS = 2
STUDENT_LR = 1e-5


@pytest.fixture(autouse=True)
def two_devices(monkeypatch):
  # Batches of 2 over 2 of the 8 simulated devices: the teachers replicated beside a sharded batch.
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: make_mesh(jax.devices()[:2]))


@pytest.fixture
def persistent_compilation_cache(tmp_path):
  """XLA's on-disk cache for this test alone: the second teacher, the resumed run and the
  evaluations compile the programs of earlier stages again (new jitted closures, same HLO)."""
  keys = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = {k: getattr(jax.config, k) for k in keys}
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield
  for key, value in old.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def _config(name: str, cache_dir: str):
  config = config_utils.load_config_file(os.path.join(CONFIGS, name) + ':sim')
  config.model.update(TINY_MODEL)
  config.total_steps = STEPS
  config.warmup_epochs = 0.0  # Short runs; the schedules want a warm-up shorter than the run.
  config.log_every_steps = 1
  if 'synthetic' in config.data:
    config.data.synthetic.update(num_train=2, num_val=2)
  if 'tasks' in config.data:  # The keypoint stages.
    config.data.tasks = TASKS
    config.data.synthetic.cache_dir = cache_dir
    config.model.head_filters = 8
    config.batch_size = config.eval_batch_size = 2
  return config


def _max_distance(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_starts_from(backbone, encoder, lr: float, steps: int) -> None:
  """`backbone` is `encoder` after `steps` AdamW steps of learning rate <= lr.

  Adam moves each weight by at most about lr per step (|m_hat / sqrt(v_hat)| <= 1 for gradients
  of one sign, a little more at worst), so the backbone stays within 1.5 steps lr of the encoder
  it started from; a fresh initialisation, independent of the encoder, would be far outside.
  """
  assert jax.tree.structure(backbone) == jax.tree.structure(encoder)
  assert _max_distance(backbone, encoder) <= 1.5 * steps * lr


@pytest.mark.slow
@pytest.mark.usefixtures('persistent_compilation_cache')
def test_pretrain_teachers_pseudo_labels_distill_evaluate(tmp_path):
  cache = str(tmp_path / 'cache')

  # Stage 1: I-JEPA. Its target encoder is what init_from hands to the keypoint models.
  pretrain = _config('pretrain_ijepa.py', cache)
  pretrain.predictor.update(dim=16, depth=1, num_heads=2)
  pretrain.batch_size = 2
  trainer.train_and_evaluate(pretrain, str(tmp_path / 'ijepa'))
  pretrained = checkpoints.read_variables(str(tmp_path / 'ijepa'), 'latest')
  encoder = pretrained['target']['encoder']

  # Stage 2: two teachers from the pretrained encoder, then pseudo-labels from both.
  teachers = []
  for seed in (1, 2):
    config = _config('keypoints_from_ijepa.py', cache)
    config.seed = seed
    config.init_from.ijepa.workdir = str(tmp_path / 'ijepa')
    teachers.append(str(tmp_path / f'teacher{seed}'))
    result = trainer.train_and_evaluate(config, teachers[-1])
    assert np.isfinite(result['mre/weighted'])
    variables = checkpoints.read_variables(teachers[-1])
    _assert_starts_from(variables['params']['backbone'], encoder, config.optim.lr, STEPS)
  heads = [checkpoints.read_variables(t)['params']['heads_HC'] for t in teachers]
  assert _max_distance(*heads) > 1e-3  # Two seeds, two teachers.

  unlabelled = synthetic.ensure_dataset(tmp_path / 'unlabelled', config=synthetic.SyntheticConfig(),
                                        num_train=2, num_val=1, seed=7, task_names=TASKS)
  pseudo = str(tmp_path / 'pseudo')
  manifest = pseudo_label.pseudo_label(teachers, os.path.join(unlabelled, 'train'), pseudo)
  labelled = fmuia.load_split(os.path.join(pseudo, 'train'))
  assert len(labelled) == 2 * len(TASKS) and all(r.visible.all() for r in labelled)
  members = ensemble.load_members(teachers)
  assert manifest['teacher_hashes'] == list(members.hashes)

  # Stage 3: the student learns from labels, pseudo-labels and the teachers' median (in bf16),
  # for STEPS + 1 steps with a checkpoint after each.
  student_dir = str(tmp_path / 'student')
  config = _config('distill.py', cache)
  config.total_steps = STEPS + 1
  config.checkpoint_every_steps = 1
  config.init_from.ijepa.workdir = str(tmp_path / 'ijepa')
  config.data.pseudo_labels = (pseudo,)
  config.teachers.workdirs = tuple(teachers)
  config.teachers.compute_dtype = 'bfloat16'
  config.optim.lr = STUDENT_LR
  assert len(datasets.load_split(config.data, 'train')) == 2 * len(TASKS) + len(labelled)
  result = trainer.train_and_evaluate(config, student_dir)
  assert {'mre/weighted', 'teachers/median/mre/weighted', 'teachers/1/mre/weighted'} <= set(result)
  saved = checkpoints.read_variables(student_dir, 'latest')
  _assert_starts_from(saved['params']['backbone'], encoder, STUDENT_LR, STEPS + 1)
  # The checkpoint holds the student alone: a teacher's variable tree, once.
  teacher = checkpoints.read_variables(teachers[0])
  assert jax.tree.structure(saved) == jax.tree.structure(teacher)
  state = checkpoints.read_config(student_dir, 'latest')
  assert state['teachers']['sha256'] == list(members.hashes)
  assert state['teachers']['step_dirs'] == list(members.paths)
  runs = checkpointing.RunCheckpoints(student_dir)
  metadata = runs.latest.item_metadata(STEPS + 1)['state']
  runs.close()
  assert set(metadata) == {'step', 'rng', 'variables', 'opt_state'}
  state_bytes = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                    for m in jax.tree.leaves(metadata) if np.dtype(m.dtype) != np.dtype(object))
  student_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(saved))
  # The student and Adam's two moments of it (none for the frozen position table, a few
  # counters): no room for a teacher.
  assert 2 * student_bytes < state_bytes < 3 * student_bytes + 4096

  # Resume: as if the run had died before saving its last step; the student comes back from the
  # step before, the teachers from their folders, and the last step is redone exactly.
  last = os.path.join(student_dir, 'checkpoints', str(STEPS + 1))
  first_try = str(tmp_path / 'first_try' / str(STEPS + 1))
  os.renames(last, first_try)
  trainer.train_and_evaluate(config, student_dir)
  redone = checkpoints.read_variables(last)
  first = checkpoints.read_variables(first_try)
  for a, b in zip(jax.tree.leaves(redone), jax.tree.leaves(first)):
    np.testing.assert_array_equal(a, b)

  # Evaluation: the teachers as one ensemble, and the student as any run.
  table = evaluate.evaluate_ensemble(teachers)
  assert set(table['ensemble']) == {'median of 2'}
  summary = evaluate.evaluate_checkpoint(student_dir)
  with open(os.path.join(os.path.dirname(os.path.dirname(summary['checkpoint'])), 'eval',
                         f'best_{summary["step"]}', 'metrics.json')) as f:
    assert json.load(f)['metrics']['mre/weighted'] == pytest.approx(
        summary['metrics']['mre/weighted'])
  # The run's own teacher median is the ensemble's, on the same validation records.
  assert summary['metrics']['teachers/median/mre/weighted'] == pytest.approx(
      table['ensemble']['median of 2']['mre/weighted'], rel=2e-2)
