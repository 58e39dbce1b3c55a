"""Tests of the TUS-REC submission writer on a tiny raw data folder in the organisers' layout.

Two scans of 7 frames of 40x49 pixels with a calibration unlike the built-in one. The ground-truth
DDFs are built here as the organisers' code does (`generate_ddf_from_label` and `cal_*_ddfs`):
C^-1 T_ref^-1 T_k C applied to S times the 1-based pixel grid, in their own frame and not ours.
"""
import os
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax import pose
from dualtrack_jax import submission
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import tusrec
from ultrasound_common import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, H, W = 7, 40, 49
SX, SY = 0.3, 0.25
C = np.eye(4)
C[:3, :3] = Rotation.from_euler('zyx', [30, -20, 10], degrees=True).as_matrix()
C[:3, 3] = [-7.0, 11.0, 3.0]
CALIB_TEXT = '\n'.join([
    tusrec.CALIB_SCALE,
    *(','.join(repr(float(v)) for v in row) for row in np.diag([SX, SY, 1.0, 1.0])),
    tusrec.CALIB_IMAGE_TO_TOOL,
    *(','.join(repr(float(v)) for v in row) for row in C),
]) + '\n'
# In dataset_keys order (not sorted), which the outputs must follow.
KEYS = ('sub051__RH_rotation', 'sub050__LH_rotation')
LANDMARKS = np.array([[1, 1, 1], [3, 49, 40], [6, 20, 7], [6, 1, 40]], dtype=np.int64)


def _landmarks(seed: int) -> np.ndarray:
  """Each scan's landmarks: the corners and an inner pixel, in another order per scan."""
  return np.roll(LANDMARKS, seed, axis=0)


def _tforms(seed: int) -> np.ndarray:
  """float32 tool -> world poses of a smooth random sweep, about 100 mm from the camera."""
  rng = np.random.default_rng(seed)
  rotvec = np.cumsum(rng.normal(0, 0.05, (N, 3)), axis=0) + [0.3, -0.2, 1.0]
  t = np.tile(np.eye(4), (N, 1, 1))
  t[:, :3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
  t[:, :3, 3] = np.cumsum(rng.normal(0, 1.0, (N, 3)), axis=0) + [60.0, -80.0, 40.0]
  return t.astype(np.float32)


def _h5(path, **datasets) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, 'w') as f:
    for k, v in datasets.items():
      f.create_dataset(k, data=v)


@pytest.fixture(name='data', scope='module')
def fixture_data(tmp_path_factory):
  """The organisers' data folder (validation layout, with transfs/); returns (root, tforms)."""
  root = tmp_path_factory.mktemp('data')
  tforms = {}
  for seed, key in enumerate(KEYS):
    subject, name = key[3:6], key.split('__')[1]
    tforms[key] = _tforms(seed)
    frames = np.random.default_rng(seed).integers(0, 256, (N, H, W), dtype=np.uint8)
    _h5(root / 'frames' / subject / f'{name}.h5', frames=frames)
    _h5(root / 'transfs' / subject / f'{name}.h5', tforms=tforms[key])
    _h5(root / 'landmarks' / f'landmark_{subject}.h5', **{name: _landmarks(seed)})
  # Keys in creation order (not h5py's default alphabetical one), which test.py iterates.
  with h5py.File(root / submission.DATASET_KEYS, 'w', track_order=True) as f:
    for key in KEYS:
      f.create_dataset(key, data=np.zeros(1))
  (root / tusrec.CALIB_CSV).write_text(CALIB_TEXT)
  return root, tforms


def _official_ddfs(tforms, landmarks):
  """GP, GL, LP, LL of true tforms as the organisers build them, in float64."""
  tforms = tforms.astype(np.float64)
  inv = np.linalg.inv
  glob = inv(C) @ inv(tforms[0]) @ tforms[1:] @ C
  loc = inv(C) @ inv(tforms[:-1]) @ tforms[1:] @ C
  v, u = np.divmod(np.arange(H * W), W)  # reference_image_points: row-major, 1-based.
  points = np.diag([SX, SY, 1.0, 1.0]) @ np.stack([u + 1, v + 1, 0 * u, 0 * u + 1])

  def dense(t):
    return (t @ points)[:, :3] - points[:3]

  def gather(ddf):
    f, x, y = landmarks.T
    return ddf.reshape(N - 1, 3, H, W)[f - 1, :, y - 1, x - 1].T

  gp, lp = dense(glob), dense(loc)
  return gp, gather(gp), lp, gather(lp)


def _cal_dist(label, pred, axis):
  """The organisers' `cal_dist`: Euclidean norm over the xyz axis, mean over the rest."""
  return np.sqrt(((label - pred) ** 2).sum(axis=axis)).mean()


class _TrackingExperiment:
  """Predicts the true relative poses of the sweep it is given: a perfect model."""

  def predict_sweep(self, variables, reader):
    del variables
    return pose.relative_pose_vectors(reader.tracking)


def _stub_run(experiment=None):
  return types.SimpleNamespace(
      experiment=experiment or _TrackingExperiment(), variables=None, checkpoint_dir='stub/7',
      step=7, config=types.SimpleNamespace(experiment='tests.stub'))


@pytest.fixture(name='perfect', scope='module')
def fixture_perfect(data, tmp_path_factory):
  """(out folder, results) of the ground-truth model on both scans."""
  root, _ = data
  out = str(tmp_path_factory.mktemp('perfect'))
  scans = submission.find_scans(str(root / 'frames'))
  calibration, source = submission.default_calibration(str(root / 'frames'))
  assert source == str(root / tusrec.CALIB_CSV)
  return out, submission.write_submission(_stub_run(), scans, out, calibration,
                                          frames_per_chunk=4)


def test_find_scans_follows_dataset_keys(data):
  root, _ = data
  scans = submission.find_scans(str(root / 'frames'))
  assert [s.key for s in scans] == list(KEYS)
  assert scans[1] == submission.Scan(
      'sub050__LH_rotation', '050', 'LH_rotation', str(root / 'frames/050/LH_rotation.h5'),
      str(root / 'landmarks/landmark_050.h5'), str(root / 'transfs/050/LH_rotation.h5'))


def test_ground_truth_prediction_gives_the_official_ddfs(data, perfect):
  root, tforms = data
  out, results = perfect
  for seed, key in enumerate(KEYS):
    expected = submission.read_ddfs(os.path.join(out, f'{key}.h5'))
    official = _official_ddfs(tforms[key], _landmarks(seed))
    for name, got, want in zip(submission.DDF_KEYS, expected, official):
      # float32 rounding of displacements of up to ~30 mm.
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f'{key} {name}')
    # Scored as test.py scores: zero errors, a perfect score.
    for got, want, axis in zip(expected, official, (1, 0, 1, 0)):
      assert _cal_dist(want, got, axis) < 1e-5
    # The metrics' errors: what is left is float32 tforms being rigid to ~1e-7 only (pose
    # vectors give exact rotations).
    r = results[key]
    assert [r[k] for k in ('GPE', 'GLE', 'LPE', 'LLE')] == pytest.approx([0] * 4, abs=1e-6)
    assert r['score'] == pytest.approx(1.0, abs=1e-6)
    assert 0 < r['time_elapsed'] < 60 and r['time_write'] >= 0


def test_layout_dtype_and_order(data, perfect):
  root, _ = data
  out, results = perfect
  assert sorted(os.listdir(out)) == sorted([f'{k}.h5' for k in KEYS] + ['metrics.h5'])
  for key in KEYS:
    with h5py.File(os.path.join(out, f'{key}.h5'), 'r') as f:
      assert list(f.keys()) == ['GP', 'GL', 'LP', 'LL']  # predict_ddfs' return order
      shapes = {k: f[k].shape for k in f}
      assert shapes == {'GP': (N - 1, 3, H * W), 'GL': (3, 4), 'LP': (N - 1, 3, H * W),
                        'LL': (3, 4)}
      assert all(f[k].dtype == np.float32 for k in f)
      assert f.attrs['frames'] == str(root / 'frames' / key[3:6] / f'{key[8:]}.h5')
      assert f.attrs['step'] == 7
  with h5py.File(os.path.join(out, 'metrics.h5'), 'r') as f:
    # The datasets of the organisers' results/metrics.h5, one entry per scan in key order.
    assert {'GPE', 'GLE', 'LPE', 'LLE', 'time_elapsed'} <= set(f)
    assert [s.decode() for s in f['scans'][()]] == list(KEYS)
    np.testing.assert_array_equal(f['time_elapsed'][()],
                                  [results[k]['time_elapsed'] for k in KEYS])


def test_files_score_like_the_metrics_code(data, tmp_path):
  """An imperfect model: errors of its files against the official DDFs = the metrics' errors."""
  root, tforms = data

  class Noisy(_TrackingExperiment):
    def predict_sweep(self, variables, reader):
      vectors = super().predict_sweep(variables, reader)
      return vectors + np.random.default_rng(0).normal(0, 0.3, vectors.shape)

  scans = submission.find_scans(str(root / 'frames'))[1:]
  calibration, _ = submission.default_calibration(str(root / 'frames'))
  results = submission.write_submission(_stub_run(Noisy()), scans, str(tmp_path), calibration)
  key = scans[0].key
  files = submission.read_ddfs(str(tmp_path / f'{key}.h5'))
  official = _official_ddfs(tforms[key], _landmarks(1))
  for name, got, want, axis in zip(submission.DDF_KEYS, files, official, (1, 0, 1, 0)):
    error = {'GP': 'GPE', 'GL': 'GLE', 'LP': 'LPE', 'LL': 'LLE'}[name]
    assert results[key][error] > 0.05
    assert _cal_dist(want, got, axis) == pytest.approx(results[key][error], rel=1e-5)


def test_chunked_ddfs_equal_unchunked(data, tmp_path):
  rng = np.random.default_rng(3)
  transforms = np.tile(np.eye(4), (N - 1, 1, 1))
  transforms[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.1, (N - 1, 3))).as_matrix()
  transforms[:, :3, 3] = rng.normal(0, 5, (N - 1, 3))
  local = np.linalg.inv(transforms)
  p2i = tusrec.pixel_to_image((SX, SY), (H, W))
  files = []
  for chunk in (1, 4, N):
    path = str(tmp_path / f'{chunk}.h5')
    submission.write_ddfs(path, transforms, local, p2i, (H, W), LANDMARKS, frames_per_chunk=chunk)
    files.append(submission.read_ddfs(path))
  for other in files[1:]:
    for a, b in zip(files[0], other):
      np.testing.assert_array_equal(a, b)
  # Against a direct float64 evaluation (T q - q) at every pixel.
  v, u = np.divmod(np.arange(H * W), W)
  q = p2i @ np.stack([u, v, 0 * u, 0 * u + 1])
  np.testing.assert_allclose(files[0][0], (transforms @ q - q)[:, :3], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(  # GL is GP at the landmarks
      files[0][1], files[0][0].reshape(N - 1, 3, H, W)[
          LANDMARKS[:, 0] - 1, :, LANDMARKS[:, 2] - 1, LANDMARKS[:, 1] - 1].T)
  assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]  # written atomically


def test_bad_inputs_name_the_file(data, tmp_path):
  root, _ = data
  with pytest.raises(errors.MissingFileError, match=f'{tmp_path}/frames: no such folder'):
    submission.find_scans(str(tmp_path / 'frames'))
  # A scan whose subject has no landmark file, then one whose file lacks the scan.
  os.makedirs(tmp_path / 'frames' / '060')
  _h5(tmp_path / 'frames' / '060' / 'LH_rotation.h5', frames=np.zeros((N, H, W), np.uint8))
  _h5(tmp_path / 'landmarks' / 'landmark_061.h5', LH_rotation=LANDMARKS)
  landmarks = tmp_path / 'landmarks' / 'landmark_060.h5'
  with pytest.raises(errors.MissingFileError, match=f'{landmarks}: missing'):
    submission.find_scans(str(tmp_path / 'frames'))
  _h5(landmarks, RH_rotation=LANDMARKS)
  with pytest.raises(sweeps.SweepFileError, match=f"{landmarks}: key 'LH_rotation': missing"):
    submission.find_scans(str(tmp_path / 'frames'))
  run = _stub_run(object())
  with pytest.raises(errors.InputError, match="stub/7: config.experiment 'tests.stub' has no "
                     'predict_sweep'):
    submission.write_submission(run, [], str(tmp_path / 'out'), tusrec.Calibration.tusrec_2024())
  # A landmark on frame 0 would silently wrap to the last frame in the organisers' indexing.
  _h5(landmarks, LH_rotation=np.array([[0, 1, 1]]))
  scans = submission.find_scans(str(tmp_path / 'frames'))
  with pytest.raises(sweeps.SweepFileError, match=f"{landmarks}: key 'LH_rotation': frame must "
                     r'lie in \[1, 6\]'):
    submission.write_submission(_stub_run(), scans, str(tmp_path / 'out'),
                                tusrec.Calibration.tusrec_2024())


@pytest.mark.slow
def test_cli_with_a_real_run(data, tmp_path):
  """A tiny stage-1 run with random variables (tests/tiny_runs.py), end to end."""
  import tiny_runs  # pylint: disable=g-import-not-at-top
  root, _ = data
  _, workdir = tiny_runs.stage1_run(str(tmp_path / 'run'), str(tmp_path / 'no_cache'))

  result = subprocess.run(
      [sys.executable, '-m', 'launch.predict', f'--checkpoint={workdir}',
       f'--tusrec_frames_dir={root / "frames"}', f'--out={tmp_path}', '--frames_per_chunk=2'],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr
  out = tmp_path / 'tusrec_submission'  # Published when every scan was written.
  assert f'TUS-REC submission: {len(KEYS)} scans' in result.stdout
  assert f'Wrote {out}' in result.stdout
  for key in KEYS:
    gp, gl, lp, ll = submission.read_ddfs(str(out / f'{key}.h5'))
    assert gp.shape == lp.shape == (N - 1, 3, H * W) and gl.shape == ll.shape == (3, 4)
    assert np.isfinite(gp).all() and np.abs(lp).max() > 0
  assert sorted(os.listdir(out)) == sorted([f'{k}.h5' for k in KEYS] + ['metrics.h5'])
