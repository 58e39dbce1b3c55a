"""Tests of the h5 sweep format: round trip, lazy reads, pickling, and one test per error case."""
import os
import pickle

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax.data import sweeps

N, H, W = 5, 6, 8
SPACING = np.array([0.2, 0.3, 1.0])


def _arrays(n: int = N) -> dict:
  """A valid small sweep as the arrays write_sweep takes."""
  rng = np.random.default_rng(0)
  tracking = np.tile(np.eye(4), (n, 1, 1))
  tracking[:, :3, :3] = Rotation.from_euler('xyz', rng.uniform(-30, 30, (n, 3)),
                                            degrees=True).as_matrix()
  tracking[:, :3, 3] = rng.uniform(-50, 50, (n, 3))
  pixel_to_image = np.diag([0.2, 0.3, 1.0, 1.0])
  pixel_to_image[:2, 3] = -3.5 * 0.2, -2.5 * 0.3
  return dict(images=rng.integers(0, 256, (n, H, W), dtype=np.uint8), tracking=tracking,
              spacing=SPACING, pixel_to_image=pixel_to_image)


@pytest.fixture(name='sweep')
def fixture_sweep(tmp_path):
  """A sweep file with the optional datasets, and the arrays it was written from."""
  arrays = _arrays()
  arrays['images_downsampled_224'] = np.random.default_rng(1).integers(
      0, 256, (N, 224, 224), dtype=np.uint8)
  arrays['landmarks'] = np.array([[1, 3, 4], [4, 8, 6]], dtype=np.int32)
  path = str(tmp_path / 'sweep.h5')
  sweeps.write_sweep(path, **arrays)
  return path, arrays


def test_round_trip(sweep):
  path, a = sweep
  sweeps.validate_sweep(path)
  assert sorted(os.listdir(os.path.dirname(path))) == ['sweep.h5']  # no temporary file left
  with sweeps.SweepReader(path) as r:
    assert (r.path, r.num_frames, r.image_shape) == (path, N, (H, W))
    np.testing.assert_array_equal(r.dimensions, [W, H, 1])
    np.testing.assert_array_equal(r.spacing, SPACING)
    np.testing.assert_array_equal(r.pixel_to_image, a['pixel_to_image'])
    assert r.tracking.dtype == np.float64
    np.testing.assert_array_equal(r.tracking, a['tracking'])
    np.testing.assert_array_equal(r.images(0, N), a['images'])
    assert r.has_downsampled
    np.testing.assert_array_equal(r.downsampled_at([4, 1]), a['images_downsampled_224'][[4, 1]])
    np.testing.assert_array_equal(r.landmarks, a['landmarks'])
  with h5py.File(path, 'r') as f:
    assert f[sweeps.IMAGES].chunks == (1, H, W)
    assert f[sweeps.IMAGES].compression is None
    assert f[sweeps.IMAGES_224].chunks == (1, 224, 224)
    assert f[sweeps.DIMENSIONS].dtype.kind == 'i'


def test_float32_tracking_is_read_as_float64(tmp_path):
  a = _arrays()
  a['tracking'] = a['tracking'].astype(np.float32)
  path = tmp_path / 'f32.h5'
  sweeps.write_sweep(path, **a)
  with h5py.File(path, 'r') as f:
    assert f[sweeps.TRACKING].dtype == np.float32
  r = sweeps.SweepReader(path)
  assert r.tracking.dtype == np.float64
  np.testing.assert_array_equal(r.tracking, a['tracking'].astype(np.float64))
  assert not r.has_downsampled and r.landmarks is None
  with pytest.raises(sweeps.SweepFileError, match='images_downsampled-224'):
    r.downsampled_at([0])


def test_frame_range_and_index_reads(sweep):
  path, a = sweep
  images = a['images']
  r = sweeps.SweepReader(path)
  out = r.images(1, 4)
  assert out.dtype == np.uint8 and out.flags.c_contiguous
  np.testing.assert_array_equal(out, images[1:4])
  assert r.images(2, 2).shape == (0, H, W)
  np.testing.assert_array_equal(r.images_at([4, 0, 4, 2]), images[[4, 0, 4, 2]])
  np.testing.assert_array_equal(r.images_at(np.array([[3, 1], [1, 0]])), images[[[3, 1], [1, 0]]])
  assert r.images_at([]).shape == (0, H, W)
  with pytest.raises(IndexError, match='sweep.h5'):
    r.images(3, N + 1)
  with pytest.raises(IndexError):
    r.images_at([0, N])
  with pytest.raises(IndexError):
    r.images_at([-1])
  with pytest.raises(TypeError):
    r.images_at([0.0, 1.0])


def test_reader_is_lazy_and_picklable(sweep, tmp_path):
  path, a = sweep
  # Construction touches nothing: a missing file only fails on first access.
  missing = sweeps.SweepReader(tmp_path / 'missing.h5')
  with pytest.raises(sweeps.SweepFileError, match='missing.h5.*does not exist'):
    _ = missing.num_frames

  before = pickle.loads(pickle.dumps(sweeps.SweepReader(path)))
  np.testing.assert_array_equal(before.images_at([2]), a['images'][[2]])

  opened = sweeps.SweepReader(path)
  np.testing.assert_array_equal(opened.images(0, 1), a['images'][:1])
  # An open h5py handle cannot be pickled, so this also checks that the handle is dropped.
  after = pickle.loads(pickle.dumps(opened))
  np.testing.assert_array_equal(after.images(3, 5), a['images'][3:5])
  np.testing.assert_array_equal(after.tracking, a['tracking'])
  opened.close()
  np.testing.assert_array_equal(opened.images(4, 5), a['images'][4:])  # reopens after close
  opened.close()
  after.close()
  before.close()


def test_validation_reads_no_pixels(tmp_path):
  """A 100k-frame 480x640 sweep (30 GB if read) whose images were never written validates fast."""
  n = 100_000
  path = tmp_path / 'big.h5'
  with h5py.File(path, 'w') as f:
    f.create_dataset(sweeps.IMAGES, shape=(n, 480, 640), dtype=np.uint8, chunks=(1, 480, 640))
    f.create_dataset(sweeps.TRACKING, data=np.tile(np.eye(4), (n, 1, 1)))
    f.create_dataset(sweeps.SPACING, data=SPACING)
    f.create_dataset(sweeps.PIXEL_TO_IMAGE, data=np.eye(4))
    f.create_dataset(sweeps.DIMENSIONS, data=[640, 480, 1])
  assert os.path.getsize(path) < 20e6
  sweeps.validate_sweep(path)
  r = sweeps.SweepReader(path)
  assert r.num_frames == n
  assert r.images_at([n - 1, 7]).shape == (2, 480, 640)


def _tracking_frame(i: int, change):
  """Replaces tracking[i] by change(tracking[i])."""
  def mutate(a):
    a['tracking'] = a['tracking'].copy()
    a['tracking'][i] = change(a['tracking'][i])
  return mutate


def _set(key, value):
  def mutate(a):
    a[key] = value(a) if callable(value) else value
  return mutate


# (case id, change to valid arrays, key the message must name, other text it must contain).
ERROR_CASES = [
    *[(f'missing-{k}', (lambda k: lambda a: a.pop(k))(k), k, 'missing')
      for k in ('images', 'tracking', 'spacing', 'pixel_to_image', 'dimensions')],
    ('images-dtype', _set('images', lambda a: a['images'].astype(np.float32)), 'images', 'uint8'),
    ('images-rank', _set('images', lambda a: a['images'][0]), 'images', 'shape'),
    ('one-frame', lambda a: a.update(images=a['images'][:1], tracking=a['tracking'][:1]),
     'images', 'at least 2'),
    ('tracking-dtype', _set('tracking', lambda a: a['tracking'].astype(np.int64)), 'tracking',
     'float'),
    ('tracking-shape', _set('tracking', lambda a: a['tracking'][:, :3]), 'tracking', 'shape'),
    ('length-mismatch', _set('tracking', lambda a: a['tracking'][:-1]), 'tracking',
     f'{N - 1} matrices'),
    ('tracking-nan', _tracking_frame(2, lambda m: m * np.nan), 'tracking',
     'non-finite values in tracking[2]'),
    ('tracking-scaled', _tracking_frame(3, lambda m: m @ np.diag([1.01, 1, 1, 1])), 'tracking',
     'tracking[3] is not a rigid transform (tolerance 0.0001)'),
    ('tracking-reflection', _tracking_frame(1, lambda m: m @ np.diag([1, 1, -1, 1])), 'tracking',
     'det R = -1'),
    ('tracking-last-row', _tracking_frame(4, lambda m: np.vstack([m[:3], [0.5, 0, 0, 1]])),
     'tracking', 'tracking[4] is not a rigid transform'),
    ('spacing-nan', _set('spacing', np.array([0.2, np.nan, 1.0])), 'spacing', 'non-finite'),
    ('spacing-shape', _set('spacing', np.array([0.2, 0.3])), 'spacing', 'shape'),
    ('spacing-negative', _set('spacing', np.array([0.2, -0.3, 1.0])), 'spacing', 'positive'),
    ('pixel-to-image-inf', _set('pixel_to_image', np.diag([np.inf, 1.0, 1.0, 1.0])),
     'pixel_to_image', 'non-finite'),
    ('pixel-to-image-shape', _set('pixel_to_image', np.eye(3)), 'pixel_to_image', 'shape'),
    ('dimensions-swapped', _set('dimensions', np.array([H, W, 1])), 'dimensions',
     f'({W}, {H}, 1)'),
    ('downsampled-shape', _set('images_downsampled_224', np.zeros((N, 224, 200), np.uint8)),
     'images_downsampled-224', 'shape'),
    ('downsampled-length', _set('images_downsampled_224', np.zeros((N - 1, 224, 224), np.uint8)),
     'images_downsampled-224', 'shape'),
    ('landmarks-frame', _set('landmarks', np.array([[N, 1, 1]])), 'landmarks', 'frame index'),
    ('landmarks-dtype', _set('landmarks', np.array([[1.0, 1.0, 1.0]])), 'landmarks', 'integer'),
]
_H5_KEYS = {'images_downsampled_224': sweeps.IMAGES_224}


@pytest.mark.parametrize('mutate,key,text', [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_malformed_file_is_reported(tmp_path, mutate, key, text):
  a = _arrays()
  a['dimensions'] = np.array([W, H, 1])
  mutate(a)
  path = str(tmp_path / 'bad.h5')
  with h5py.File(path, 'w') as f:  # Written directly: write_sweep would refuse.
    for k, v in a.items():
      f.create_dataset(_H5_KEYS.get(k, k), data=v)
  for check in (sweeps.validate_sweep, lambda p: sweeps.SweepReader(p).num_frames):
    with pytest.raises(sweeps.SweepFileError) as e:
      check(path)
    assert path in str(e.value) and f"key '{key}'" in str(e.value) and text in str(e.value)
    assert (e.value.path, e.value.key) == (path, key)
  if text == 'missing':
    return  # write_sweep has no way to omit a key.
  # The writer refuses the same arrays and leaves nothing behind.
  out = tmp_path / 'out' / 'w.h5'
  out.parent.mkdir()
  with pytest.raises(sweeps.SweepFileError, match=f"w.h5: key '{key}'"):
    sweeps.write_sweep(out, **a)
  assert not os.listdir(out.parent)


def test_group_instead_of_dataset(tmp_path):
  path = str(tmp_path / 'group.h5')
  with h5py.File(path, 'w') as f:
    for k, v in _arrays().items():
      if k != 'tracking':
        f.create_dataset(k, data=v)
    f.create_dataset('dimensions', data=[W, H, 1])
    f.create_group('tracking')
  with pytest.raises(sweeps.SweepFileError, match=f"{path}: key 'tracking': expected an array"):
    sweeps.validate_sweep(path)


def test_truncated_and_non_h5_files(tmp_path):
  path = str(tmp_path / 'truncated.h5')
  sweeps.write_sweep(path, **_arrays())
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(sweeps.SweepFileError, match='truncated.h5: not a readable HDF5 file'):
    sweeps.validate_sweep(path)
  text = tmp_path / 'text.h5'
  text.write_text('not hdf5')
  with pytest.raises(sweeps.SweepFileError, match='text.h5: not a readable HDF5 file'):
    sweeps.SweepReader(text).images(0, 1)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  """A crash mid-write leaves the old complete file in place and no temporary file."""
  path = tmp_path / 's.h5'
  sweeps.write_sweep(path, **_arrays())

  def crash(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(h5py.Group, 'create_dataset', crash)
  new = _arrays(n=3)
  with pytest.raises(RuntimeError, match='disk full'):
    sweeps.write_sweep(path, **new)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['s.h5']
  assert sweeps.SweepReader(path).num_frames == N


def test_sweep_without_tracking_opens_only_when_allowed(tmp_path):
  a = _arrays()
  a['dimensions'] = np.array([W, H, 1])
  del a['tracking']
  path = str(tmp_path / 'sensorless.h5')
  with h5py.File(path, 'w') as f:
    for k, v in a.items():
      f.create_dataset(k, data=v)
  with pytest.raises(sweeps.SweepFileError, match="key 'tracking': missing"):
    sweeps.SweepReader(path).num_frames
  with sweeps.SweepReader(path, require_tracking=False) as reader:
    assert reader.tracking is None and reader.num_frames == N
    np.testing.assert_array_equal(reader.images(0, N), a['images'])
  # A present but malformed tracking is still an error.
  with h5py.File(path, 'a') as f:
    f.create_dataset('tracking', data=np.zeros((N, 4, 4)))
  with pytest.raises(sweeps.SweepFileError, match='not a rigid transform'):
    sweeps.SweepReader(path, require_tracking=False).num_frames
