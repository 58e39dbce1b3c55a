"""Tests of the TUS-REC converter on tiny raw scans written here (5 frames of 6x8 pixels)."""
import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax.data import registry
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import tusrec

N, H, W = 5, 6, 8
SX, SY = 0.5, 0.25
# A calibration unlike the built-in one, so that using the wrong one shows.
C = np.eye(4)
C[:3, :3] = Rotation.from_euler('zyx', [30, -20, 10], degrees=True).as_matrix()
C[:3, 3] = [-7.0, 11.0, 3.0]
CALIB_TEXT = '\n'.join([
    'scaling_from_pixel_to_mm',
    *(','.join(repr(float(v)) for v in row) for row in np.diag([SX, SY, 1.0, 1.0])),
    'spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system',
    *(','.join(repr(float(v)) for v in row) for row in C),
]) + '\n'


def _tforms(seed: int) -> np.ndarray:
  """float32 tool -> world poses: identity, a pure translation, then random rigid poses."""
  t = np.tile(np.eye(4), (N, 1, 1))
  t[1, :3, 3] = [10.0, -20.0, 30.0]
  rng = np.random.default_rng(seed)
  t[2:, :3, :3] = Rotation.from_rotvec(rng.normal(size=(N - 2, 3))).as_matrix()
  t[2:, :3, 3] = rng.uniform(-100, 100, (N - 2, 3))
  return t.astype(np.float32)


def _frames(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (N, H, W), dtype=np.uint8)


def _h5(path, **datasets) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, 'w') as f:
    for k, v in datasets.items():
      f.create_dataset(k, data=v)
  return str(path)


@pytest.fixture(name='raw', scope='module')
def fixture_raw(tmp_path_factory):
  """Raw challenge folders; returns (root, {sweep_id: (frames, tforms)}).

  root/train: training layout (subjects 000 and 051, landmarks for 000) and a calib_matrix.csv;
  root/val: validation/test layout (subject 060).
  """
  root = tmp_path_factory.mktemp('raw')
  scans = {}
  for seed, (subject, scan) in enumerate([('000', 'LH_rotation'), ('051', 'RH_Par_C_DtP')]):
    scans[f'sub{subject}__{scan}'] = frames, tforms = _frames(seed), _tforms(seed)
    _h5(root / 'train' / 'frames_transfs' / subject / f'{scan}.h5', frames=frames, tforms=tforms)
  _h5(root / 'train' / 'landmarks' / 'landmark_000.h5',
      LH_rotation=np.array([[1, 1, 1], [4, 8, 6]], dtype=np.int64))
  scans['sub060__LH_rotation'] = frames, tforms = _frames(7), _tforms(7)
  _h5(root / 'val' / 'frames' / '060' / 'LH_rotation.h5', frames=frames)
  _h5(root / 'val' / 'transfs' / '060' / 'LH_rotation.h5', tforms=tforms)
  (root / 'train' / 'calib_matrix.csv').write_text(CALIB_TEXT)
  return root, scans


@pytest.fixture(name='converted', scope='module')
def fixture_converted(raw, tmp_path_factory):
  root, _ = raw
  calibration = tusrec.Calibration.from_csv(str(root / 'train' / 'calib_matrix.csv'))
  scans = tusrec.find_scans(str(root / 'train')) + tusrec.find_scans(str(root / 'val'))
  out = tmp_path_factory.mktemp('out')
  return tusrec.convert_scans(scans, str(out), calibration=calibration)


def test_calibration_csv():
  calibration = tusrec.Calibration.tusrec_2024()
  assert calibration.spacing == (0.229389190673828, 0.220979690551758)
  assert np.linalg.det(calibration.image_to_tool[:3, :3]) == pytest.approx(1.0, abs=1e-12)


def test_read_calibration(raw):
  root, _ = raw
  calibration = tusrec.Calibration.from_csv(str(root / 'train' / 'calib_matrix.csv'))
  assert calibration.spacing == (SX, SY)
  np.testing.assert_array_equal(calibration.image_to_tool, C)
  assert calibration.differs_from(tusrec.Calibration.tusrec_2024())
  assert not calibration.differs_from(calibration)


@pytest.mark.parametrize('line,value,key,text', [
    (3, '0,0.25,0', tusrec.CALIB_SCALE, 'line 3: expected 4 finite numbers'),
    (2, '0.5,0,0,1', tusrec.CALIB_SCALE, 'expected diag(sx, sy, 1, 1)'),
    (8, '0,1,0,abc', tusrec.CALIB_IMAGE_TO_TOOL, 'line 8'),
    (7, '2,0,0,0', tusrec.CALIB_IMAGE_TO_TOOL, 'not a rigid transform'),
])
def test_bad_calibration(tmp_path, line, value, key, text):
  lines = CALIB_TEXT.splitlines()
  lines[line - 1] = value
  path = str(tmp_path / 'calib_matrix.csv')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  with pytest.raises(sweeps.SweepFileError) as e:
    tusrec.Calibration.from_csv(path)
  assert str(e.value).startswith(f"{path}: key '{key}'") and text in str(e.value)


def test_pixel_to_image_matches_the_original_constants():
  m = tusrec.pixel_to_image(tusrec.SPACING_2024, (480, 640))
  original = np.array([[0.22938919, 0.0, 0.0, -73.28984642],
                       [0.0, 0.22097969, 0.0, -52.92463589],
                       [0.0, 0.0, 1.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(m, original, rtol=0, atol=5e-9)  # the original rounds to 8 decimals
  np.testing.assert_allclose(m @ [319.5, 239.5, 0, 1], [0, 0, 0, 1], atol=1e-12)


def test_converted_sweeps(raw, converted):
  _, scans = raw
  records = registry.read_sweep_csv(converted)
  assert {r.sweep_id: r.split for r in records} == {
      'sub000__LH_rotation': 'train', 'sub051__RH_Par_C_DtP': 'val',
      'sub060__LH_rotation': 'test'}
  # C @ Tr((W+1)/2*sx, (H+1)/2*sy, 0) with W=8, H=6, sx=0.5, sy=0.25, written out by hand.
  shift = np.array([[1, 0, 0, 2.25], [0, 1, 0, 0.875], [0, 0, 1, 0], [0, 0, 0, 1]])
  expected_p2i = np.array([[0.5, 0, 0, -1.75], [0, 0.25, 0, -0.625], [0, 0, 1, 0], [0, 0, 0, 1]])
  u, v = np.meshgrid(np.arange(W), np.arange(H))
  pixels = np.stack([u.ravel(), v.ravel(), np.zeros(H * W), np.ones(H * W)])
  tusrec_pixels = pixels + [[1], [1], [0], [0]]
  for record in records:
    frames, tforms = scans[record.sweep_id]
    with sweeps.SweepReader(record.path) as r:
      np.testing.assert_array_equal(r.images(0, N), frames)
      np.testing.assert_array_equal(r.spacing, [SX, SY, 1])
      np.testing.assert_array_equal(r.dimensions, [W, H, 1])
      np.testing.assert_allclose(r.pixel_to_image, expected_p2i, rtol=0, atol=1e-15)
      tracking = r.tracking
      np.testing.assert_allclose(tracking[0], C @ shift, rtol=0, atol=1e-12)  # tforms = identity
      translated = C @ shift
      translated[:3, 3] += [10.0, -20.0, 30.0]
      np.testing.assert_allclose(tracking[1], translated, rtol=0, atol=1e-12)
      for k in range(N):
        # DualTrack pixel (u, v) lands where TUS-REC pixel (u+1, v+1) lands.
        want = tforms[k].astype(np.float64) @ C @ np.diag([SX, SY, 1, 1]) @ tusrec_pixels
        np.testing.assert_allclose(tracking[k] @ r.pixel_to_image @ pixels, want, atol=1e-10)
      if record.sweep_id == 'sub000__LH_rotation':
        np.testing.assert_array_equal(r.landmarks, [[1, 1, 1], [4, 8, 6]])
      else:
        assert r.landmarks is None
  assert records[0].extra['subject'] == '000' and records[0].extra['scan'] == 'LH_rotation'


def test_default_split():
  assert [tusrec.default_split(s) for s in ('000', '049', '050', '052', '053', '099')] == [
      'train', 'train', 'val', 'val', 'test', 'test']
  with pytest.raises(ValueError, match="subject folder 'scans'"):
    tusrec.default_split('scans')


def test_input_csv(raw, tmp_path):
  """The original converter's input CSV: one joint file, one frames + tforms pair."""
  root, scans = raw
  path = tmp_path / 'input.csv'
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['sweep_id', 'raw_tus_rec_sweep_path', 'raw_tus_rec_frames_path',
                'raw_tus_rec_tforms_path', 'split', 'check_against'])
    w.writerow(['s_joint', os.path.relpath(root / 'train/frames_transfs/051/RH_Par_C_DtP.h5',
                                           tmp_path), '', '', 'train', 'x.h5'])
    w.writerow(['s_pair', '', root / 'val/frames/060/LH_rotation.h5',
                root / 'val/transfs/060/LH_rotation.h5', '', ''])
  out = tmp_path / 'out'
  csv_path = tusrec.convert_scans(tusrec.read_input_csv(str(path)), str(out))
  records = registry.read_sweep_csv(csv_path)
  assert [(r.sweep_id, r.split) for r in records] == [('s_joint', 'train'), ('s_pair', 'test')]
  assert records[0].extra['check_against'] == 'x.h5'
  frames, tforms = scans['sub060__LH_rotation']
  r = sweeps.SweepReader(records[1].path)
  np.testing.assert_array_equal(r.images(0, N), frames)
  # Default (built-in 2024) calibration.
  builtin = tusrec.Calibration.tusrec_2024()
  np.testing.assert_allclose(
      r.tracking, tusrec.tusrec_to_tracking(tforms, builtin, (H, W)), rtol=0, atol=1e-12)
  np.testing.assert_array_equal(r.spacing, [*tusrec.SPACING_2024, 1])


RAW_ERRORS = [
    ('frames-dtype', dict(frames=np.zeros((N, H, W), np.float32)), 'frames', 'uint8'),
    ('frames-missing', dict(images=np.zeros((N, H, W), np.uint8)), 'frames', 'missing'),
    ('one-frame', dict(frames=np.zeros((1, H, W), np.uint8)), 'frames', 'fewer than 2'),
    ('tforms-length', dict(tforms=np.tile(np.eye(4), (N - 1, 1, 1))), 'tforms',
     f'expected ({N}, 4, 4)'),
    ('tforms-non-rigid', dict(tforms=np.tile(np.diag([2.0, 1, 1, 1]), (N, 1, 1))), 'tforms',
     'tforms[0] is not a rigid transform'),
]


@pytest.mark.parametrize('datasets,key,text', [c[1:] for c in RAW_ERRORS],
                         ids=[c[0] for c in RAW_ERRORS])
def test_raw_input_errors(tmp_path, datasets, key, text):
  # Validation layout; the case's datasets replace the good ones in their file.
  frames_file = {k: v for k, v in datasets.items() if k != 'tforms'} or {'frames': _frames(0)}
  frames_path = _h5(tmp_path / 'frames' / '001' / 's.h5', **frames_file)
  tforms_path = _h5(tmp_path / 'transfs' / '001' / 's.h5',
                    tforms=datasets.get('tforms', _tforms(0)))
  (scan,) = tusrec.find_scans(str(tmp_path))
  with pytest.raises(sweeps.SweepFileError) as e:
    tusrec.convert_scans([scan], str(tmp_path / 'out'))
  bad_file = tforms_path if key == 'tforms' else frames_path
  assert str(e.value).startswith(f"{bad_file}: key '{key}'") and text in str(e.value)


def test_missing_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match='frames_transfs/'):
    tusrec.find_scans(str(tmp_path))


def test_cli(raw, tmp_path):
  root, _ = raw
  reg = tmp_path / 'datasets.json'
  out = tmp_path / 'cli_out'
  result = subprocess.run(
      [sys.executable, '-m', 'dualtrack_jax.data.tusrec', f'--data_dir={root / "train"}',
       f'--data_dir={root / "val"}', f'--out={out}', '--split=val', '--register_as=tiny',
       f'--registry={reg}'],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  # No --calibration: the built-in one is used, with a warning about the shipped CSV.
  assert 'calib_matrix.csv differs from the built-in 2024 calibration' in result.stderr
  records = registry.load_sweeps('tiny', 'val', registry=reg)
  assert len(records) == 3 and records[0].path == str(out / 'sub000__LH_rotation.h5')
  np.testing.assert_array_equal(sweeps.SweepReader(records[0].path).spacing,
                                [*tusrec.SPACING_2024, 1])
