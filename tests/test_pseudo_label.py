"""Pseudo-labelling (sonichu_jax/pseudo_label.py) and mixing its output into training records.

Two tiny teachers with random variables label a folder of synthetic images: the output must read
back through the FM_UIA reader with the teachers' median (checked against each teacher's own
`predict_image`), the spread threshold and per-task caps must keep exactly the images their
definition says, `config.data.pseudo_labels` must add them to the training records only, and bad
input must fail before anything is written.
"""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import tiny_runs
from launch import config_utils
from launch import sharding
from launch import trainer
from sonichu_jax import ensemble
from sonichu_jax import pseudo_label
from sonichu_jax.data import datasets
from sonichu_jax.data import fmuia
from sonichu_jax.data import synthetic
from sonichu_jax.experiments import keypoints
from ultrasound_common import checkpoints
from ultrasound_common import errors

COUNTS = {'HC': 5, 'fetal_femur': 3}
TEACHER = os.path.join(tiny_runs.ROOT, 'configs', 'sonichu', 'teacher.py')
# regime -> (seed, pseudo-label folder, task_exponent), as teacher.py's docstring defines them.
REGIMES = {'r1': (1, 'round1', 1.0), 'r2': (2, 'round2', 1.0), 'r3': (3, 'round3', 1.0),
           'selective': (4, 'round3_selective', 1.0), 'balanced': (5, 'round3_balanced', 0.0)}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(base, config of the teachers, [two teacher runs], unlabelled folder)."""
  base = tmp_path_factory.mktemp('pseudo_label')
  cache = str(base / 'cache')
  config, first = tiny_runs.sonichu_run(str(base / 'teacher0'), 0, cache)
  _, second = tiny_runs.sonichu_run(str(base / 'teacher1'), 1, cache)
  folder = base / 'unlabelled'
  for task, n in COUNTS.items():
    os.makedirs(folder / task)
    for i in range(n):
      Image.fromarray(synthetic.generate(task, 100 + i)['image']).save(folder / task / f'{i}.png')
  (folder / 'HC' / 'notes.txt').write_text('not an image')  # Ignored.
  return base, config, [first, second], str(folder)


@pytest.fixture(scope='module')
def labelled(setup):
  """(manifest, out folder) of labelling everything, no threshold, no cap."""
  base, _, teachers, folder = setup
  out = str(base / 'pseudo_all')
  return pseudo_label.pseudo_label(teachers, folder, out, tta=False, batch_size=2), out


def _spreads(out: str) -> dict[str, dict[str, float]]:
  with open(os.path.join(out, pseudo_label.SPREAD_NAME)) as f:
    rows = list(csv.DictReader(f))
  spreads = {}
  for row in rows:
    spreads.setdefault(row['task_id'], {})[row['image_path']] = float(row['spread_px'])
  return spreads


def test_labels_read_back_as_the_teachers_median(setup, labelled):
  _, config, teachers, folder = setup
  manifest, out = labelled
  records = fmuia.load_split(os.path.join(out, 'train'))
  assert {t: sum(r.task == t for r in records) for t in COUNTS} == COUNTS
  assert manifest['counts'] == {t: {'images': n, 'kept': n} for t, n in COUNTS.items()}
  assert manifest['teacher_hashes'] == list(ensemble.load_members(teachers).hashes)
  experiment = keypoints.Experiment(config, load_data=False)
  variables = [checkpoints.read_variables(t) for t in teachers]
  spreads = _spreads(out)
  for record in records[::2]:
    assert record.visible.all() and record.image_path.startswith(folder)
    image = fmuia.read_image(record)
    alone = np.stack([experiment.predict_image(v, image, record.task)['keypoints_px']
                      for v in variables])
    np.testing.assert_allclose(record.keypoints, np.median(alone, axis=0), atol=2e-3)
    # Two teachers: each is half their distance from the median; the image's is the largest.
    half = 0.5 * np.linalg.norm(alone[0] - alone[1], axis=-1).max()
    assert spreads[record.task][record.image_path] == pytest.approx(half, abs=1e-3)


def test_threshold_and_caps_keep_the_most_confident(setup, labelled):
  base, _, teachers, folder = setup
  spreads = _spreads(labelled[1])
  threshold = float(np.median(list(spreads['HC'].values())))
  out = str(base / 'pseudo_selected')
  manifest = pseudo_label.pseudo_label(teachers, folder, out, max_spread=threshold,
                                       caps={'fetal_femur': 1}, tta=False, batch_size=2)
  kept = {}
  for record in fmuia.load_split(os.path.join(out, 'train')):
    kept.setdefault(record.task, set()).add(record.image_path)
  confident = {t: {p for p, s in spreads[t].items() if s <= threshold} for t in COUNTS}
  assert kept.get('HC', set()) == confident['HC'] and len(confident['HC']) >= 3
  femur = sorted(confident['fetal_femur'], key=spreads['fetal_femur'].get)[:1]
  assert kept.get('fetal_femur', set()) == set(femur)
  assert manifest['counts']['HC']['kept'] == len(confident['HC'])
  with open(os.path.join(out, pseudo_label.MANIFEST_NAME)) as f:
    assert json.load(f)['max_spread_px'] == threshold


def test_config_mixes_pseudo_labels_into_training_only(setup, labelled):
  _, config, _, _ = setup
  data = config.data.copy_and_resolve_references()
  train, val = datasets.load_split(data, 'train'), datasets.load_split(data, 'val')
  data.pseudo_labels = (labelled[1],)
  assert len(datasets.load_split(data, 'train')) == len(train) + sum(COUNTS.values())
  assert len(datasets.load_split(data, 'val')) == len(val)
  data.pseudo_labels = (labelled[1] + '_missing',)
  with pytest.raises(errors.MissingFileError, match=r'pseudo_labels\[0\]'):
    datasets.load_split(data, 'train')


def test_fmuia_input_and_validation_leak(setup, tmp_path):
  _, config, teachers, _ = setup
  val = datasets.load_split(config.data, 'val')
  split_folder = os.path.dirname(os.path.dirname(val[0].source.rpartition(':')[0]))
  out = str(tmp_path / 'pseudo_val')
  manifest = pseudo_label.pseudo_label(teachers[:1], split_folder, out, task_names=['HC'],
                                       tta=False)
  assert manifest['counts'] == {'HC': {'images': sum(r.task == 'HC' for r in val),
                                       'kept': sum(r.task == 'HC' for r in val)}}
  data = config.data.copy_and_resolve_references()
  data.pseudo_labels = (out,)
  with pytest.raises(errors.InputError, match='is a validation image'):
    datasets.load_split(data, 'train')


def test_bad_input_fails_before_writing(setup, tmp_path):
  _, _, teachers, folder = setup
  out = str(tmp_path / 'out')
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(errors.InputError, match='no images to label'):
    pseudo_label.pseudo_label(teachers, str(tmp_path / 'empty'), out)
  with pytest.raises(errors.MissingFileError, match='no such folder'):
    pseudo_label.pseudo_label(teachers, str(tmp_path / 'nowhere'), out)
  with pytest.raises(ensemble.MemberError, match='missing_teacher: no such run folder'):
    pseudo_label.pseudo_label([teachers[0], str(tmp_path / 'missing_teacher')], folder, out)
  with pytest.raises(errors.InputError, match='needs two or more --teachers'):
    pseudo_label.pseudo_label(teachers[:1], folder, out, max_spread=3.0)
  os.makedirs(tmp_path / 'cardiac' / 'A4C')
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / 'cardiac' / 'A4C' / 'x.png')
  with pytest.raises(errors.InputError, match=r"tasks \['A4C'\], which the teachers"):
    pseudo_label.pseudo_label(teachers, str(tmp_path / 'cardiac'), out)
  os.makedirs(tmp_path / 'odd' / 'heads')
  with pytest.raises(errors.InputError, match='subfolder .*heads is not named as a task'):
    pseudo_label.pseudo_label(teachers, str(tmp_path / 'odd'), out)
  assert not os.path.exists(out)
  os.makedirs(out)
  with pytest.raises(errors.ExistsError, match='exists'):
    pseudo_label.pseudo_label(teachers, folder, out)
  assert os.listdir(tmp_path).count('out') == 1 and not any(
      name.startswith('.out.') for name in os.listdir(tmp_path))
  for item, message in (('FUGC', 'expected TASK=N'), ('XYZ=3', 'XYZ'), ('HC=-1', 'N >= 0')):
    with pytest.raises(errors.InputError, match=message):
      pseudo_label.parse_caps([item])
  assert pseudo_label.parse_caps(['HC=2', 'fetal_femur=0']) == {'HC': 2, 'fetal_femur': 0}


@pytest.mark.slow
def test_command_line(setup):
  base, _, teachers, folder = setup
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root)
  out = str(base / 'pseudo_cli')
  result = subprocess.run(
      [sys.executable, '-m', 'sonichu_jax.pseudo_label', f'--teachers={teachers[0]}',
       f'--teachers={teachers[1]}', f'--images={folder}', f'--out={out}', '--cap=HC=2',
       '--notta'], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'HC                2 of      5' in result.stdout
  assert len(fmuia.load_split(os.path.join(out, 'train'))) == 2 + COUNTS['fetal_femur']
  result = subprocess.run(
      [sys.executable, '-m', 'sonichu_jax.pseudo_label', f'--teachers={teachers[0]}',
       f'--images={base / "no_such"}', f'--out={out}_2'], cwd=root, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'no such folder' in result.stderr


@pytest.mark.parametrize('variant', [f'{r}{s}' for r in REGIMES for s in ('', ':sim')])
def test_teacher_configs(variant):
  config = config_utils.load_config_file(f'{TEACHER}:{variant}')
  regime = variant.partition(':')[0]
  seed, folder, exponent = REGIMES[regime]
  assert (config.seed, config.data.task_exponent) == (seed, exponent)
  assert config.data.pseudo_labels[0].endswith(folder)
  assert dict(config.init_from.ijepa.collections) == {'params': 'target'}
  assert (config.model.embed_dim == 64) == variant.endswith(':sim')


@pytest.mark.slow
def test_teacher_trains_on_labels_and_pseudo_labels(setup, labelled, monkeypatch):
  """teacher.py:r1:sim, tiny, one step from a keypoint run's backbone (standing in for I-JEPA)."""
  base, tiny, teachers, _ = setup
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: make_mesh(jax.devices()[:1]))
  config = config_utils.load_config_file(f'{TEACHER}:r1:sim')
  config.data = tiny.data.copy_and_resolve_references()
  config.data.pseudo_labels = (labelled[1],)
  config.data.task_exponent = 1.0
  config.model = tiny.model
  config.init_from.ijepa.update(workdir=teachers[0], checkpoint='best', map=[('backbone',) * 2],
                                collections={'params': 'params'})
  config.update(batch_size=2, eval_batch_size=2, total_steps=1, warmup_epochs=0.0)
  workdir = str(base / 'teacher_r1')
  final = trainer.train_and_evaluate(config, workdir)
  assert np.isfinite(final['mre/weighted'])
  experiment = keypoints.Experiment(config)
  assert len(experiment.train_records) == 2 * 2 + sum(COUNTS.values())
  assert len(experiment.val_records) == 2 * 3
