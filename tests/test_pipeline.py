"""Tests of dualtrack_jax.data.pipeline: batches, determinism, sharding, resume, lazy files."""
import os
import pickle

import grain
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax.data import pipeline
from dualtrack_jax.data import registry
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms as T

H, W = 24, 32
CROP = (16, 16)  # centre crop rows 4:20, cols 8:24: the frame stays centred (no tracking change)
LENGTHS = (30, 41, 52, 60, 35, 47)
SPACING = (0.3, 0.2, 1.0)


def _tracking(rng, n):
  """A smooth random rigid trajectory (SciPy is the reference for rotations)."""
  t = np.tile(np.eye(4), (n, 1, 1))
  rotvec = np.cumsum(rng.normal(scale=0.02, size=(n, 3)), axis=0)
  t[:, :3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
  t[:, :3, 3] = np.cumsum(rng.normal(scale=0.3, size=(n, 3)) + [0, 0, 0.5], axis=0)
  return t


def _write(folder, name, n, rng, downsampled=False):
  path = os.path.join(folder, f'{name}.h5')
  p2i = np.array([[SPACING[0], 0, 0, -SPACING[0] * (W - 1) / 2],
                  [0, SPACING[1], 0, -SPACING[1] * (H - 1) / 2], [0, 0, 1, 0], [0, 0, 0, 1.0]])
  small = rng.integers(0, 256, (n, 224, 224), dtype=np.uint8) if downsampled else None
  sweeps.write_sweep(path, images=rng.integers(0, 256, (n, H, W), dtype=np.uint8),
                     tracking=_tracking(rng, n), spacing=SPACING, pixel_to_image=p2i,
                     images_downsampled_224=small)
  return registry.SweepRecord(name, path, 'train', {})


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('sweeps'))
  rng = np.random.default_rng(0)
  return [_write(folder, f'sweep{i}', n, rng) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope='module')
def downsampled_record(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('small'))
  return _write(folder, 'small', 12, np.random.default_rng(1), downsampled=True)


def _take(ds, n, state=None):
  it = iter(ds)
  try:
    if state is not None:
      it.set_state(state)
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _local(records, **kw):
  args = dict(window=8, crop_hw=CROP, batch_size=4, seed=1, augment=T.LOCAL_AUGMENT)
  return pipeline.local_windows(records, **{**args, **kw})


def test_local_windows_batches(records):
  (batch,) = _take(_local(records, augment=None), 1)
  assert batch['images'].shape == (4, 8, *CROP) and batch['images'].dtype == np.uint8
  assert batch['targets'].shape == (4, 7, 6) and batch['targets'].dtype == np.float32
  assert batch['targets_global'].shape == (4, 7, 6) and batch['targets_global'].dtype == np.float32
  assert batch['sweep_index'].dtype == np.int32 and batch['start'].dtype == np.int32
  for b in range(4):
    reader = sweeps.SweepReader(records[batch['sweep_index'][b]].path)
    start = batch['start'][b]
    assert 0 <= start <= reader.num_frames - 8
    np.testing.assert_array_equal(batch['images'][b],
                                  reader.images(start, start + 8)[:, 4:20, 8:24])
    t = reader.tracking[start:start + 8]
    rel = np.linalg.inv(t[:-1]) @ t[1:]
    np.testing.assert_allclose(batch['targets'][b][:, :3], rel[:, :3, 3], atol=1e-4)
    np.testing.assert_allclose(batch['targets'][b][:, 3:], Rotation.from_matrix(
        rel[:, :3, :3]).as_euler('xyz', degrees=True), atol=1e-4)
    reader.close()


def test_one_window_per_sweep_per_epoch(records):
  batches = _take(_local(records, batch_size=2, augment=None), 6)  # 2 epochs of 6 sweeps
  epochs = np.concatenate([b['sweep_index'] for b in batches]).reshape(2, 6)
  for epoch in epochs:
    assert sorted(epoch) == list(range(6))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_short_sweeps_are_skipped(records):
  batches = _take(_local(records, window=50, batch_size=1, augment=None), 4)
  assert {int(b['sweep_index'][0]) for b in batches} == {2, 3}  # only 52 and 60 frames fit
  with pytest.raises(ValueError, match='>= 61 frames'):
    _local(records, window=61)


def test_bad_arguments_fail_early(records):
  with pytest.raises(ValueError, match=r'crop_hw \(32, 16\)'):
    _local(records, crop_hw=(32, 16))
  with pytest.raises(ValueError, match='multiple of the number of processes 3'):
    _local(records, batch_size=4, shard_count=3)
  with pytest.raises(ValueError, match='global_source'):
    pipeline.global_samples(records, num_samples=8, batch_size=2, seed=0, augment=None,
                            global_source='full')
  with pytest.raises(ValueError, match='crops 50 px per side'):
    pipeline.whole_sweeps(records, crop_hw=CROP, seed=0, augment=None, shuffle=False,
                          global_source='context')
  with pytest.raises(sweeps.SweepFileError, match='images_downsampled-224'):
    pipeline.whole_sweeps(records, crop_hw=CROP, seed=0, augment=None, shuffle=False,
                          global_source='downsampled')


def test_same_seed_same_batches(records):
  a, b = _take(_local(records), 3), _take(_local(records), 3)
  _assert_batches_equal(a, b)
  c = _take(_local(records, seed=2), 3)
  assert not all(np.array_equal(x['images'], y['images']) for x, y in zip(a, c))


def test_shards_together_give_the_global_batches(records):
  global_batches = _take(_local(records, batch_size=4), 3)
  shards = [_take(_local(records, batch_size=4, shard_index=p, shard_count=2), 3)
            for p in range(2)]
  for j, batch in enumerate(global_batches):
    for key, value in batch.items():
      # Process p holds rows [p*b, (p+1)*b) of every global batch.
      joined = np.concatenate([shards[0][j][key], shards[1][j][key]])
      np.testing.assert_array_equal(joined, value, err_msg=key)


def test_resume_from_state_in_process(records):
  ds = _local(records)
  it = iter(ds)
  _ = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  _assert_batches_equal(_take(ds, 2, state=state), expected)


def test_resume_from_state_with_two_workers(records):
  ds = _local(records, num_workers=2)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it.close()
  _assert_batches_equal(first + expected, _take(_local(records), 6))  # workers change nothing
  _assert_batches_equal(_take(ds, 3, state=state), expected)


def test_resume_through_orbax(records, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ds = _local(records)
  it = iter(ds)
  next(it)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / 'ds', args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(2)]
  it.close()
  restored = iter(ds)
  checkpointer.restore(tmp_path / 'ds', args=grain.checkpoint.CheckpointRestore(restored))
  got = [next(restored) for _ in range(2)]
  restored.close()
  _assert_batches_equal(got, expected)


def _open_files(paths):
  fds = '/proc/self/fd'
  targets = {os.path.realpath(os.path.join(fds, fd)) for fd in os.listdir(fds)}
  return {p for p in paths if os.path.realpath(p) in targets}


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc')
def test_files_open_lazily_and_are_never_pickled(tmp_path):
  rng = np.random.default_rng(2)
  records = [_write(str(tmp_path), f'lazy{i}', 10 + i, rng) for i in range(3)]
  paths = [r.path for r in records]
  source = pipeline.SweepSource(records)
  assert _open_files(paths) == set()  # metadata read at construction, files closed again
  ref = source[1]
  ref.reader.images(0, 2)
  assert _open_files(paths) == {records[1].path}
  clone = pickle.loads(pickle.dumps(source))  # an open h5py handle would not pickle
  assert clone[2].num_frames == 12 and clone[2].sweep_id == 'lazy2'
  assert _open_files(paths) == {records[1].path}
  np.testing.assert_array_equal(clone[1].reader.images(0, 2), ref.reader.images(0, 2))
  for r in (ref, clone[1]):
    r.reader.close()
  assert _open_files(paths) == set()


def test_global_samples(records):
  ds = pipeline.global_samples(records, num_samples=8, batch_size=2, seed=0, augment=None)
  (batch,) = _take(ds, 1)
  assert batch['global_images'].shape == (2, 8, 224, 224)
  assert batch['global_images'].dtype == np.float32
  assert batch['indices'].shape == (2, 8) and batch['indices'].dtype == np.int32
  assert batch['targets'].shape == (2, 7, 6) and batch['targets_global'].shape == (2, 7, 6)
  reader = sweeps.SweepReader(records[batch['sweep_index'][0]].path)
  idx = batch['indices'][0]
  assert np.all(np.diff(idx) > 0) and idx[-1] < reader.num_frames
  np.testing.assert_allclose(batch['global_images'][0],
                             T.resize(reader.images_at(idx) / np.float32(255), (224, 224)),
                             atol=1e-6)
  t = reader.tracking[idx]
  np.testing.assert_allclose(batch['targets_global'][0][:, :3],
                             (np.linalg.inv(t[0]) @ t[1:])[:, :3, 3], atol=1e-4)
  reader.close()


def test_global_samples_reversed_keep_ascending_indices(records):
  always = T.Augmentation(flip_p=0, reverse_p=1, random_crop=False)
  plain = _take(pipeline.global_samples(records, num_samples=8, batch_size=2, seed=0,
                                        augment=None), 1)[0]
  rev = _take(pipeline.global_samples(records, num_samples=8, batch_size=2, seed=0,
                                      augment=always), 1)[0]
  np.testing.assert_array_equal(rev['indices'], plain['indices'])
  np.testing.assert_allclose(rev['global_images'], plain['global_images'][:, ::-1], atol=1e-6)


def test_global_samples_from_downsampled(downsampled_record):
  ds = pipeline.global_samples([downsampled_record], num_samples=4, batch_size=1, seed=0,
                               augment=None, global_source='downsampled')
  (batch,) = _take(ds, 1)
  with sweeps.SweepReader(downsampled_record.path) as reader:
    stored = reader.downsampled_at(batch['indices'][0])
  np.testing.assert_array_equal(batch['global_images'][0], stored / np.float32(255))


def test_whole_sweeps_context_images(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (3, 110, 120), dtype=np.uint8)
  path = str(tmp_path / 'big.h5')
  sweeps.write_sweep(path, images=images, tracking=_tracking(rng, 3), spacing=SPACING,
                     pixel_to_image=np.diag([*SPACING, 1.0]))
  ds = pipeline.whole_sweeps([registry.SweepRecord('big', path, 'val', {})], crop_hw=CROP, seed=0,
                             augment=None, shuffle=False, num_epochs=1, global_source='context')
  (batch,) = _take(ds, 1)
  np.testing.assert_allclose(batch['global_images'][0],
                             T.context_images(images / np.float32(255)), atol=1e-6)


def test_whole_sweeps_evaluation_order_and_content(records):
  ds = pipeline.whole_sweeps(records, crop_hw=CROP, seed=0, augment=None, shuffle=False,
                             num_epochs=1, global_source='resize')
  batches = _take(ds, len(records))
  assert [str(b['sweep_id'][0]) for b in batches] == [r.sweep_id for r in records]
  for record, batch in zip(records, batches):
    n = LENGTHS[int(batch['sweep_index'][0])]
    assert batch['images'].shape == (1, n, *CROP) and batch['images'].dtype == np.uint8
    assert batch['global_images'].shape == (1, n, 224, 224)
    assert batch['targets'].shape == (1, n - 1, 6)
    assert batch['tracking'].shape == (1, n, 4, 4) and batch['pixel_to_image'].shape == (1, 4, 4)
    np.testing.assert_array_equal(batch['indices'][0], np.arange(n))
    with sweeps.SweepReader(record.path) as reader:
      np.testing.assert_allclose(batch['tracking'][0], reader.tracking, atol=1e-9)
  it = iter(ds)
  _ = [next(it) for _ in records]
  with pytest.raises(StopIteration):
    next(it)
  it.close()


def test_whole_sweeps_2025_augmentations_keep_lengths_and_targets(records):
  ds = pipeline.whole_sweeps(records[:2], crop_hw=CROP, seed=3, augment=T.FUSION_2025_AUGMENT,
                             shuffle=True, num_epochs=None)
  lengths = set()
  for batch in _take(ds, 6):
    n = batch['images'].shape[1]
    lengths.add(n)
    assert batch['targets'].shape == (1, n - 1, 6) and batch['tracking'].shape == (1, n, 4, 4)
    t = batch['tracking'][0]  # targets are computed from the augmented tracking
    np.testing.assert_allclose(batch['targets'][0][:, :3],
                               (np.linalg.inv(t[:-1]) @ t[1:])[:, :3, 3], atol=1e-4)
  assert lengths <= {LENGTHS[0], LENGTHS[1], int(LENGTHS[0] * 0.9), int(LENGTHS[1] * 0.9)}
  assert len(lengths) > 1  # some sweeps were subsampled


def test_whole_sweeps_reverse_flip_random_crop_keep_world_positions(records):
  """Every returned crop pixel maps to the world point of the source pixel it shows."""
  always = T.Augmentation(flip_p=1, reverse_p=1, random_crop=True)
  (batch,) = _take(pipeline.whole_sweeps(records[:1], crop_hw=CROP, seed=0, augment=always,
                                         shuffle=False), 1)
  with sweeps.SweepReader(records[0].path) as reader:
    frames = reader.images(0, reader.num_frames)
    tracking, p2i = reader.tracking, reader.pixel_to_image
  n, (h, w) = len(frames), CROP
  crops = batch['images'][0]
  # Locate the crop in the mirrored last frame (random content: the match is unique).
  mirrored = frames[-1][:, ::-1]
  (top, left), = [(i, j) for i in range(H - h + 1) for j in range(W - w + 1)
                  if np.array_equal(mirrored[i:i + h, j:j + w], crops[0])]
  rows, cols = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing='ij'))
  src_cols = W - 1 - (cols + left)
  for k in range(n):
    np.testing.assert_array_equal(crops[k][rows, cols], frames[n - 1 - k][rows + top, src_cols])
    ones = np.ones_like(rows)
    out_world = batch['tracking'][0][k] @ batch['pixel_to_image'][0] @ np.stack(
        [cols, rows, 0 * ones, ones])
    src_world = tracking[n - 1 - k] @ p2i @ np.stack([src_cols, rows + top, 0 * ones, ones])
    np.testing.assert_allclose(out_world, src_world, atol=1e-9)
