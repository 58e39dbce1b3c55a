"""Tests of the SONICHU data: synthetic generator, FM_UIA loader, augmentations, Grain pipelines."""
import dataclasses
import math
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from sonichu_jax import metrics
from sonichu_jax import preprocess
from sonichu_jax import tasks
from sonichu_jax.data import augment
from sonichu_jax.data import datasets
from sonichu_jax.data import fmuia
from sonichu_jax.data import pipeline
from sonichu_jax.data import synthetic

# An augmentation that only flips: no similarity, no intensity change.
FLIP_ONLY = augment.AugmentConfig(flip_p=1.0, no_flip_tasks=(), rotation_deg=0.0, scale=(1.0, 1.0),
                                  translate=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0),
                                  brightness=0.0, noise_std=0.0)


def _sample(image: np.ndarray, point) -> float:
  """Bilinear value of `image` at the continuous point (x, y) (pixel (i, j) at (j + .5, i + .5))."""
  x, y = point[0] - 0.5, point[1] - 0.5
  j, i = int(math.floor(x)), int(math.floor(y))
  fx, fy = x - j, y - i
  h, w = image.shape
  value = 0.0
  for di, wy in ((0, 1 - fy), (1, fy)):
    for dj, wx in ((0, 1 - fx), (1, fx)):
      value += wy * wx * image[min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
  return value


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('biometry')
  synthetic.write_dataset(root, config=synthetic.SyntheticConfig(), num_train=3,
                          num_val={'HC': 3, 'IVC': 1}, seed=0)
  return str(root)


def test_generator_is_deterministic_and_sizes_vary():
  first = synthetic.generate('HC', (0, 0, 3, 7))
  again = synthetic.generate('HC', (0, 0, 3, 7))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  other = synthetic.generate('HC', (0, 0, 3, 8))
  assert other['image'].shape != first['image'].shape or not np.array_equal(
      other['image'], first['image'])
  assert first['image'].dtype == np.uint8
  shapes = {synthetic.generate('FUGC', i)['image'].shape for i in range(6)}
  assert len(shapes) > 1


@pytest.mark.parametrize('task', tasks.TASK_NAMES)
def test_keypoints_lie_inside_with_the_task_count(task):
  for index in range(3):
    sample = synthetic.generate(task, (1, 0, 0, index))
    h, w = sample['image'].shape
    k = sample['keypoints']
    assert k.shape == (tasks.get_task(task).num_keypoints, 2)
    assert np.all((k > 0) & (k < [w, h])), (task, index, k)


@pytest.mark.parametrize('task', ['HC', 'FA'])
def test_ellipse_axis_ends_lie_on_the_bright_ring(task):
  for index in range(4):
    sample = synthetic.generate(task, (2, 0, 0, index))
    k, echo, image = sample['keypoints'], sample['echo'], sample['image'].astype(float)
    windows = []
    for p in k:
      assert _sample(echo, p) > 5.0  # the wall or skull (soft tissue is ~1)
      i, j = int(p[1]), int(p[0])
      windows.append(image[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean())
    # The speckled image is brighter there (3x3 windows) than on average: much for the skull, less
    # for the abdominal wall.
    assert np.mean(windows) > image.mean() + (40 if task == 'HC' else 8)
    # Each diameter's ends are ordered image-left first (the task table's convention).
    assert k[0, 0] <= k[1, 0] and k[2, 0] <= k[3, 0]
    # The two diameters bisect each other at the ellipse centre.
    np.testing.assert_allclose(k[:2].mean(0), k[2:].mean(0), atol=1e-9)


def test_femur_ends_on_bone_with_the_bulkier_proximal_end():
  for index in range(4):
    sample = synthetic.generate('fetal_femur', (3, 0, 0, index))
    echo, (proximal, distal) = sample['echo'], sample['keypoints']
    assert _sample(echo, proximal) > 20 and _sample(echo, distal) > 20
    axis = (distal - proximal) / np.linalg.norm(distal - proximal)
    normal = np.array([-axis[1], axis[0]])
    # Bone width across the axis near each end: the proximal end is wider.
    width = [sum(_sample(echo, end + 0.5 * d * normal) > 20 for d in range(-30, 31))
             for end in (proximal + 2 * axis, distal - 2 * axis)]
    assert width[0] > width[1]


def _dark(echo, point) -> bool:
  return _sample(echo, point) < 0.1  # blood and fluid are below 0.003, soft tissue ~1


def _bright(echo, point) -> bool:
  return _sample(echo, point) > 1.5


def _check_cavity_pair(echo, a, b, offset=1.5):
  """a, b are the inner edges of a cavity: dark just inside, not dark (tissue or wall) outside."""
  d = (b - a) / np.linalg.norm(b - a)
  assert _dark(echo, (a + b) / 2)
  assert _dark(echo, a + offset * d) and _dark(echo, b - offset * d)
  assert _sample(echo, a - offset * d) > 0.3 and _sample(echo, b + offset * d) > 0.3


@pytest.mark.parametrize('task,cavities', [
    ('IVC', ('IVC',)), ('PSAX', ('RVOT', 'PA')), ('A4C', metrics.MEASUREMENT_NAMES['A4C']),
    ('PLAX', ('LV', 'RV', 'LA', 'LVOT', 'VAO', 'AV', 'STJ', 'AAO', 'RVOT'))])
def test_cavity_keypoints_sit_on_the_inner_walls(task, cavities):
  names = metrics.MEASUREMENT_NAMES[task]
  for index in range(3):
    sample = synthetic.generate(task, (4, 0, 0, index))
    pairs = dict(zip(names, sample['keypoints'].reshape(-1, 2, 2)))
    for name in cavities:
      _check_cavity_pair(sample['echo'], *pairs[name])
    if task == 'PLAX':  # the walls: the septum and the posterior wall are myocardium
      for name in ('IVS', 'LVPW'):
        assert _bright(sample['echo'], pairs[name].mean(0))
    # Anterior (upper) point first for the vertical PLAX and IVC measurements.
    if task in ('PLAX', 'IVC'):
      assert all(a[1] < b[1] for a, b in pairs.values())


def test_fugc_internal_os_borders_fluid():
  for index in range(4):
    sample = synthetic.generate('FUGC', (5, 0, 0, index))
    internal, external = sample['keypoints']
    out = (internal - external) / np.linalg.norm(internal - external)
    assert _dark(sample['echo'], internal + 0.2 * min(sample['echo'].shape) * out)
    assert not _dark(sample['echo'], external - 0.2 * min(sample['echo'].shape) * out)


def test_aop_tangent_and_nearest_point_of_the_skull():
  for index in range(4):
    sample = synthetic.generate('AOP', (6, 0, 0, index))
    k, echo = sample['keypoints'], sample['echo']
    cranial, inferior, tangent, nearest = k
    aop = metrics.measure('AOP', k)['AoP']
    assert 95.0 <= aop <= 145.0
    for p in k:
      assert _sample(echo, p) > 20  # symphysis ends and skull points are bone
    # Skull pixels: bright and more than 6 px from the symphysis segment.
    ys, xs = np.nonzero(echo > 25)
    pixels = np.stack([xs + 0.5, ys + 0.5], -1)
    axis = cranial - inferior
    along = np.clip((pixels - inferior) @ axis / (axis @ axis), 0.0, 1.0)
    skull = pixels[np.linalg.norm(pixels - inferior - along[:, None] * axis, axis=-1) > 6.0]
    angles = metrics.angle_degrees(cranial, inferior, skull)
    # T is where the line from I touches the skull's centre line: skull pixels reach the angle of T
    # and exceed it by at most the ring's half thickness (< 4 px) seen from I.
    reach = math.degrees(math.atan(4.0 / np.linalg.norm(tangent - inferior)))
    assert aop - 0.5 < angles.max() < aop + reach
    assert np.linalg.norm(skull - nearest, axis=-1).min() < 1.0
    assert np.linalg.norm(skull - inferior, axis=-1).min() == pytest.approx(
        np.linalg.norm(nearest - inferior), abs=3.0)


def test_dataset_round_trip(dataset):
  records = fmuia.load_split(os.path.join(dataset, 'train'))
  assert [r.task for r in records[::3]] == sorted(tasks.TASK_NAMES)  # one CSV per task, by name
  for record in records[::4]:
    index = int(record.image_ref.rsplit('_', 1)[1][:-4])
    sample = synthetic.generate(record.task, synthetic.sample_seed(0, 'train', record.task, index))
    np.testing.assert_allclose(record.keypoints, sample['keypoints'], atol=5e-4)
    np.testing.assert_array_equal(fmuia.read_image(record), sample['image'])
    assert record.image_hw == sample['image'].shape and record.visible.all()
  val = fmuia.load_split(os.path.join(dataset, 'val'))
  assert [r.task for r in val] == ['HC', 'HC', 'HC', 'IVC']
  assert [r.task for r in fmuia.load_split(os.path.join(dataset, 'val'), ['IVC'])] == ['IVC']


def _write(tmp_path, header, rows, image_hw=(20, 30)):
  (tmp_path / 'csv_files').mkdir(exist_ok=True)
  (tmp_path / 'img').mkdir(exist_ok=True)
  Image.fromarray(np.zeros(image_hw, np.uint8)).save(tmp_path / 'img' / 'a.png')
  path = tmp_path / 'csv_files' / 'bad.csv'
  path.write_text('\n'.join([header] + rows) + '\n')
  return str(path)


HEADER = 'image_path,task_id,task_name,num_classes,point_1_xy,point_2_xy,point_3_xy'
OK_ROW = '../img/a.png,IVC,Regression,2,"[1, 2]","[3.5, 4]",'


@pytest.mark.parametrize('row,line_column,message', [
    ('../img/a.png,XYZ,Regression,2,"[1, 2]","[3, 4]",', ('line 3', "'task_id'"), 'valid tasks'),
    ('../img/a.png,IVC,Regression,4,"[1, 2]","[3, 4]",', ('line 3', "'num_classes'"), 'has 2'),
    ('../img/b.png,IVC,Regression,2,"[1, 2]","[3, 4]",', ('line 3', "'image_path'"),
     'does not exist'),
    ('../img/a.png,IVC,Regression,2,"[1, NaN]","[3, 4]",', ('line 3', "'point_1_xy'"),
     'non-finite'),
    ('../img/a.png,IVC,Regression,2,"[1, 2]","[3, Infinity]",', ('line 3', "'point_2_xy'"),
     'non-finite'),
    ('../img/a.png,IVC,Regression,2,"[1, 2","[3, 4]",', ('line 3', "'point_1_xy'"), 'JSON pair'),
    ('../img/a.png,IVC,Regression,2,"[1, 2, 3]","[3, 4]",', ('line 3', "'point_1_xy'"),
     'JSON pair'),
    ('../img/a.png,IVC,Regression,2,"[1, 2]","[3, 4]","[5, 6]"', ('line 3', "'point_3_xy'"),
     'beyond the 2 keypoints'),
])
def test_loader_errors_name_file_line_and_column(tmp_path, row, line_column, message):
  path = _write(tmp_path, HEADER, [OK_ROW, row])
  with pytest.raises(fmuia.AnnotationError, match=message) as info:
    fmuia.read_csv(path)
  text = str(info.value)
  assert path in text and all(part in text for part in line_column), text


def test_loader_missing_column_duplicates_and_skipped_rows(tmp_path):
  path = _write(tmp_path, 'image_path,task_name,num_classes', ['../img/a.png,Regression,2'])
  with pytest.raises(fmuia.AnnotationError, match="column 'task_id': missing column"):
    fmuia.read_csv(path)
  _write(tmp_path, HEADER, [OK_ROW, OK_ROW])
  with pytest.raises(fmuia.AnnotationError, match='already annotated at .*bad.csv:2'):
    fmuia.load_split(tmp_path)
  # Rows of other FM_UIA task kinds are skipped; a missing point is (0, 0) and invisible.
  path = _write(tmp_path, HEADER, [OK_ROW.replace('"[1, 2]"', '').replace(',2,', ',2.0,'),
                                   '../img/x.png,breast_2cls,classification,2,,,'])
  (record,) = fmuia.read_csv(path)
  np.testing.assert_array_equal(record.keypoints, [[0.0, 0.0], [3.5, 4.0]])
  np.testing.assert_array_equal(record.visible, [False, True])
  assert record.image_hw == (20, 30) and record.source.endswith('bad.csv:2')
  with pytest.raises(fmuia.AnnotationError, match='no \\*.csv file'):
    fmuia.load_split(tmp_path / 'img')


def test_fair_split_holds_out_fifteen_percent(dataset):
  records = fmuia.load_split(os.path.join(dataset, 'train'))
  train, val = fmuia.fair_split(records)
  assert len(val) == round(0.15 * len(records)) and len(train) + len(val) == len(records)
  assert {id(r) for r in train}.isdisjoint({id(r) for r in val})
  assert [id(r) for r in fmuia.fair_split(records)[1]] == [id(r) for r in val]


def _smooth_image(h, w, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.random((h // 8 + 2, w // 8 + 2))
  y = np.linspace(0, coarse.shape[0] - 1.001, h)
  x = np.linspace(0, coarse.shape[1] - 1.001, w)
  rows = np.array([np.interp(x, np.arange(coarse.shape[1]), r) for r in coarse])
  image = np.array([np.interp(y, np.arange(coarse.shape[0]), c) for c in rows.T]).T
  return np.round(image * 255).astype(np.uint8)


def test_flip_twice_is_identity_and_swaps_pairs():
  image = _smooth_image(90, 140)
  gray = image.astype(np.float32)
  np.testing.assert_array_equal(
      augment.warp(augment.warp(np.pad(gray, ((0, 166), (0, 116))), augment.flip_matrix()),
                   augment.flip_matrix()), np.pad(gray, ((0, 166), (0, 116))))
  points = np.array([[10.0, 20.0], [100.0, 30.0], [60.0, 5.0], [70.0, 80.0]])
  flip = augment.flip_matrix()
  np.testing.assert_allclose(augment.transform_points(flip, augment.transform_points(flip, points)),
                             points)
  # Flip augmentation of an image == the mirrored image with mirrored, pair-swapped keypoints.
  visible = np.array([True, True, False, True])
  flipped = augment.prepare(image, points, visible, 'HC', np.random.default_rng(0), FLIP_ONLY)
  mirrored_points = np.column_stack([140 - points[:, 0], points[:, 1]])[[1, 0, 3, 2]]
  plain = augment.prepare(image[:, ::-1].copy(), mirrored_points, visible[[1, 0, 3, 2]], 'HC')
  np.testing.assert_allclose(flipped['image'], plain['image'], atol=2e-5)
  np.testing.assert_allclose(flipped['keypoints'], plain['keypoints'], atol=1e-6)
  np.testing.assert_array_equal(flipped['visible'], plain['visible'])
  # Keypoint 0 of the flipped HC image is the mirror of original keypoint 1 (left first again).
  assert flipped['keypoints'][0, 0] == pytest.approx(1 - 100.0 / 140)
  # Tasks without pairs keep their order; cardiac views are never flipped.
  femur = augment.prepare(image, points[:2], visible[:2], 'fetal_femur', np.random.default_rng(0),
                          FLIP_ONLY)
  np.testing.assert_allclose(femur['keypoints'][:, 0], 1 - points[:2, 0] / 140, atol=1e-6)
  cardiac = augment.prepare(image, points, visible, 'PSAX', np.random.default_rng(0),
                            dataclasses.replace(FLIP_ONLY, no_flip_tasks=('PSAX',)))
  np.testing.assert_allclose(cardiac['keypoints'], points / [140, 90], atol=1e-6)


def test_no_augmentation_is_the_model_preprocessing():
  image = _smooth_image(70, 110)
  points = np.array([[10.0, 20.0], [100.0, 30.0]])
  out = augment.prepare(image, points, np.ones(2, bool), 'IVC')
  np.testing.assert_array_equal(out['image'], preprocess.preprocess(image)[0])
  np.testing.assert_allclose(out['keypoints'], points / [110, 70], rtol=1e-6)
  identity = dataclasses.replace(FLIP_ONLY, flip_p=0.0)
  same = augment.prepare(image, points, np.ones(2, bool), 'IVC', np.random.default_rng(0),
                         identity)
  np.testing.assert_allclose(same['image'], out['image'], atol=2e-6)


@pytest.mark.parametrize('image_hw', [(96, 96), (80, 200)])
def test_rotation_and_scale_keep_keypoints_on_the_same_content(image_hw):
  image = _smooth_image(*image_hw, seed=1)
  rng = np.random.default_rng(1)
  points = rng.uniform([0.3 * image_hw[1], 0.3 * image_hw[0]],
                       [0.7 * image_hw[1], 0.7 * image_hw[0]], size=(16, 2))
  config = dataclasses.replace(FLIP_ONLY, flip_p=0.0, rotation_deg=30.0, scale=(0.8, 1.25),
                               translate=0.05)
  plain = augment.prepare(image, points, np.ones(16, bool), 'A4C')
  moved = augment.prepare(image, points, np.ones(16, bool), 'A4C', rng, config)
  assert np.abs(moved['keypoints'] - plain['keypoints']).max() > 0.02  # something moved
  size = augment.SIZE
  before = [_sample(plain['image'][..., 0], p * size) for p in plain['keypoints']]
  after = [_sample(moved['image'][..., 0], p * size) for p in moved['keypoints']]
  # The smooth image varies by ~0.2 normalised units per pixel at most; resampling keeps values.
  np.testing.assert_allclose(after, before, atol=0.05)
  assert np.std(before) > 0.3


def test_similarity_is_a_rotation_of_the_original_image():
  h, w = 100, 300
  matrix = augment.similarity_matrix(30.0, 1.5, (0.0, 0.0), (h, w))
  stretch = np.diag([augment.SIZE / w, augment.SIZE / h])
  original = np.linalg.inv(stretch) @ matrix[:2, :2] @ stretch  # the map in original pixels
  np.testing.assert_allclose(original.T @ original, 1.5 ** 2 * np.eye(2), atol=1e-12)
  np.testing.assert_allclose(augment.transform_points(matrix, np.array([[128.0, 128.0]])),
                             [[128.0, 128.0]])


def test_augmented_keypoints_stay_inside():
  image = _smooth_image(64, 64)
  points = np.array([[1.0, 1.0], [63.0, 63.0]])
  config = dataclasses.replace(augment.AugmentConfig(), translate=0.3, scale=(1.2, 1.5))
  for seed in range(10):
    out = augment.prepare(image, points, np.ones(2, bool), 'IVC', np.random.default_rng(seed),
                          config)
    assert np.all((out['keypoints'] >= 0) & (out['keypoints'] <= 1))


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_training_batches_are_one_task_deterministic_and_resumable(dataset):
  records = fmuia.load_split(os.path.join(dataset, 'train'))
  ds = pipeline.train_batches(records, batch_size=4, seed=3)
  batches = _take(ds, 5)
  for batch in batches:
    name = pipeline.batch_task(batch)
    assert all(records[i].task == name for i in batch['index'])
    k = tasks.get_task(name).num_keypoints
    assert batch['image'].shape == (4, 256, 256, 3) and batch['keypoints'].shape == (4, 22, 2)
    assert batch['visible'][:, :k].all() and not batch['visible'][:, k:].any()
    assert np.all(batch['weight'] == 1)
  # Resume: the state after 3 batches continues with batches 4 and 5.
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = iter(pipeline.train_batches(records, batch_size=4, seed=3))
  resumed.set_state(state)
  for expected in batches[3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # Two processes together read exactly the rows of one.
  halves = [_take(pipeline.train_batches(records, batch_size=4, seed=3, shard_index=p,
                                         shard_count=2), 2) for p in range(2)]
  for step in range(2):
    for key in batches[step]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batches[step][key])


def test_task_sampling_rule():
  records = ([fmuia.KeypointRecord('x', 'x', 'HC', np.zeros((4, 2)), np.ones(4, bool), (8, 8), '')]
             * 30 + [fmuia.KeypointRecord('y', 'y', 'IVC', np.zeros((2, 2)), np.ones(2, bool),
                                          (8, 8), '')] * 10)
  assert pipeline.task_probabilities(records, 0.0) == {'HC': 0.5, 'IVC': 0.5}
  assert pipeline.task_probabilities(records, 1.0) == {'HC': 0.75, 'IVC': 0.25}
  slots = pipeline._TrainSlots(records, batch_size=4, seed=0, task_exponent=1.0, num_steps=8000,
                               shard_index=0, shard_count=1)
  drawn = [slots.task_and_occurrence(s) for s in range(8000)]
  hc = sum(t == 0 for t, _ in drawn)
  assert abs(hc / 8000 - 0.75) < 0.02
  # Occurrences count each task's steps: per task 0, 1, 2, ... across the block boundary (4096).
  for task in (0, 1):
    assert [o for t, o in drawn if t == task] == list(range(sum(t == task for t, _ in drawn)))
  # Each pass over a task's records visits every record once.
  rows = [slots[i].record for i in range(4 * 100) if slots[i].task == tasks.TASK_NAMES.index('IVC')]
  assert sorted(rows[:10]) == list(range(30, 40))


def test_eval_batches_cover_every_record_once(dataset):
  records = fmuia.load_split(os.path.join(dataset, 'val'))  # 3 HC, 1 IVC
  batches = list(pipeline.eval_batches(records, batch_size=2))
  assert [pipeline.batch_task(b) for b in batches] == ['HC', 'HC', 'IVC']
  assert [b['index'].tolist() for b in batches] == [[0, 1], [2, -1], [3, -1]]
  assert [b['weight'].tolist() for b in batches] == [[1, 1], [1, 0], [1, 0]]
  first = batches[0]
  np.testing.assert_allclose(first['keypoints'][0, :4],
                             records[0].keypoints / np.array(records[0].image_hw)[::-1], rtol=1e-6)
  np.testing.assert_array_equal(first['image_hw'][0], records[0].image_hw)
  halves = [list(pipeline.eval_batches(records, batch_size=2, shard_index=p, shard_count=2))
            for p in range(2)]
  assert [b['index'].tolist() for b in halves[1]] == [[1], [-1], [-1]]


def test_config_datasets_synthetic_cache_and_fair_split(tmp_path, dataset):
  data = ml_collections.ConfigDict(dict(
      dataset='synthetic', tasks=['IVC'], synthetic=dict(
          num_train=4, num_val=2, seed=1, cache_dir=str(tmp_path),
          generator=dict(image_hw=[64, 80]))))
  train = datasets.load_split(data, 'train')
  assert [r.task for r in train] == ['IVC'] * 4
  assert all(max(r.image_hw) <= 96 for r in train)
  again = datasets.load_split(data, 'val')  # the cached folder is reused, not regenerated
  assert len(again) == 2 and len(list(tmp_path.glob('synthetic/biometry-*'))) == 1
  real = ml_collections.ConfigDict(dict(dataset=dataset, fair_split=True))
  held = datasets.load_split(real, 'val')
  assert len(held) == 4 and len(datasets.load_split(real, 'train')) == 27 - 4
  with pytest.raises(ValueError, match='split must be one of'):
    datasets.load_split(real, 'test')
