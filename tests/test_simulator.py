"""Tests of the sweep simulator: determinism, the decorrelation cue, motion, output files."""
import dataclasses
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.special import spence

from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator
from dualtrack_jax.data import sweeps

# Short sweeps: everything else keeps its default value.
SHORT = simulator.SimulatorConfig(num_frames=(12, 16))
# Pure elevational motion at 0.1 mm per frame through speckle only (no layers, vessels, bones, no
# depth attenuation, negligible electronic noise); the skin line in the top 2 mm is cropped away.
ELEVATIONAL = dataclasses.replace(
    simulator.SimulatorConfig(), height=72, width=64, num_frames=(40, 40),
    speed_mm_per_frame=(0.1, 0.1), lateral_drift_mm=0.0, axial_drift_mm=0.0,
    rotation_deg=(0.0, 0.0, 0.0), num_layers=0, num_vessels=0, num_bones=0,
    attenuation_db_per_cm=0.0, noise_db=-80.0)
SKIN_ROWS = 7  # 2.1 mm at 0.3 mm per row


def _log_image_correlation(dz_mm: float, beam_fwhm_mm: float) -> float:
  """Correlation of log-envelope images of circular Gaussian speckle dz apart (independent theory).

  The intensity correlation of a Gaussian elevational PSF is rho = exp(-4 ln2 dz^2 / FWHM^2), and
  for log intensities corr = Li2(rho) / Li2(1) (SciPy: Li2(x) = spence(1 - x)).
  """
  rho = np.exp(-4.0 * np.log(2.0) * dz_mm ** 2 / beam_fwhm_mm ** 2)
  return float(spence(1.0 - rho) / spence(0.0))


def test_same_seed_same_bytes_different_seed_differs():
  a, b, c = (simulator.simulate_sweep(SHORT, s) for s in (3, 3, 4))
  assert a['images'].dtype == np.uint8 and a['tracking'].dtype == np.float64
  assert a['images'].tobytes() == b['images'].tobytes()
  assert a['tracking'].tobytes() == b['tracking'].tobytes()
  assert not np.array_equal(a['tracking'][1:], c['tracking'][1:len(a['tracking'])])
  n = min(len(a['images']), len(c['images']))
  assert np.mean(a['images'][:n] != c['images'][:n]) > 0.5


def test_landmarks_are_tusrec_style_and_leave_the_images_unchanged():
  with_landmarks = simulator.simulate_sweep(SHORT, 5)
  without = simulator.simulate_sweep(dataclasses.replace(SHORT, num_landmarks=0), 5)
  assert 'landmarks' not in without
  assert with_landmarks['images'].tobytes() == without['images'].tobytes()
  landmarks = with_landmarks['landmarks']
  n = len(with_landmarks['tracking'])
  assert landmarks.shape == (20, 3) and landmarks.dtype == np.int64
  # Frames 1..N-1 (frame 0 has no displacement), x in 1..W and y in 1..H (1-based pixels).
  for column, high in ((0, n - 1), (1, 128), (2, 96)):
    assert 1 <= landmarks[:, column].min() and landmarks[:, column].max() <= high


def test_geometry_arrays_follow_the_dualtrack_format():
  out = simulator.simulate_sweep(SHORT, 0)
  n = len(out['tracking'])
  assert SHORT.num_frames[0] <= n <= SHORT.num_frames[1]
  assert out['images'].shape == (n, 96, 128)
  np.testing.assert_array_equal(out['spacing'], [0.3, 0.3, 1.0])
  # The centre pixel (63.5, 47.5) maps to the image origin, pixel (0, 0) to (-19.05, -14.25) mm.
  centre = out['pixel_to_image'] @ np.array([63.5, 47.5, 0.0, 1.0])
  corner = out['pixel_to_image'] @ np.array([0.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(centre, [0, 0, 0, 1], atol=1e-12)
  np.testing.assert_allclose(corner, [-19.05, -14.25, 0, 1], atol=1e-12)
  # A speckle image uses the grey range (not a constant or saturated frame).
  assert 40 < out['images'].mean() < 160 and out['images'].std() > 20


@pytest.fixture(name='elevational_sweep', scope='module')
def fixture_elevational_sweep():
  return simulator.simulate_sweep(ELEVATIONAL, 0)


def test_frame_correlation_falls_with_elevational_distance(elevational_sweep):
  tracking = elevational_sweep['tracking']
  np.testing.assert_allclose(np.diff(tracking[:, 2, 3]), 0.1, atol=1e-12)
  np.testing.assert_allclose(tracking[:, :3, :3], np.broadcast_to(np.eye(3), (40, 3, 3)))
  images = elevational_sweep['images'][:, SKIN_ROWS:].reshape(40, -1).astype(np.float64)
  images -= images.mean(axis=1, keepdims=True)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  lags = np.array([1, 2, 3, 5, 7, 10, 15, 20, 25, 30])
  corr = np.array([np.mean(np.sum(images[:-k] * images[k:], axis=1)) for k in lags])
  distance = 0.1 * lags
  beam = ELEVATIONAL.elevational_beam_width_mm
  theory = np.array([_log_image_correlation(d, beam) for d in distance])
  # Matches the theory of Gaussian speckle (trilinear interpolation between slices 1/3 beam
  # width apart correlates neighbouring frames a little more than the continuous field).
  np.testing.assert_allclose(corr, theory, atol=0.06)
  assert corr[0] > 0.7  # 0.1 mm apart: still highly correlated, the cue is not trivially lost
  # Strictly decreasing up to 1 mm; beyond that, noise of +-0.03 around zero is allowed.
  assert np.all(np.diff(corr[distance <= 1.0]) < 0)
  assert np.all(np.diff(corr) < 0.03)
  assert np.all(np.abs(corr[distance >= 2 * beam]) < 0.1)


def test_interpolated_speckle_has_unit_power_between_grid_nodes():
  """The variance-corrected trilinear sample has the nodes' power at any sub-voxel offset."""
  config = simulator.SimulatorConfig()
  sigmas = np.array([config.lateral_resolution_mm, config.axial_resolution_mm,
                     config.elevational_beam_width_mm]) / (2 * np.sqrt(2 * np.log(2)))
  steps = (0.3, 1 / 6, 1 / 3)
  field = simulator._SpeckleField(  # pylint: disable=protected-access
      np.random.default_rng(0), (0.0, 0.0, 0.0), steps, (96, 120), sigmas, 48)
  field.produce(48)
  nodes = np.stack(np.meshgrid(np.arange(2, 110), np.arange(2, 90), np.arange(2, 44),
                               indexing='ij'), axis=-1).reshape(-1, 3).astype(np.float64)
  for offset in (0.0, 0.25, 0.5):
    points = (nodes + offset) * np.array(steps)
    value = field.sample(points[:, 0], points[:, 1], points[:, 2])
    assert abs(np.mean(np.abs(value) ** 2) - 1.0) < 0.05, offset


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_trajectory_is_a_smooth_elevational_sweep(seed):
  config = dataclasses.replace(simulator.SimulatorConfig(), height=8, width=8)
  tracking = simulator.simulate_sweep(config, seed)['tracking']
  n = len(tracking)
  assert 100 <= n <= 200
  rotation = tracking[:, :3, :3]
  np.testing.assert_allclose(rotation.transpose(0, 2, 1) @ rotation,
                             np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-12)
  np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-12)
  np.testing.assert_array_equal(tracking[:, 3], np.broadcast_to([0.0, 0.0, 0.0, 1.0], (n, 4)))
  # Euler angles (SciPy extrinsic xyz, the DualTrack convention) stay within the amplitudes.
  angles = Rotation.from_matrix(rotation).as_euler('xyz', degrees=True)
  assert np.all(np.abs(angles) <= np.array(config.rotation_deg) + 1e-9)
  # The image centre advances 0.1-0.5 mm per frame along the sweep and drifts within bounds.
  centre = tracking[:, :3, 3]
  step = np.diff(centre[:, 2])
  assert step.min() >= 0.1 - 1e-12 and step.max() <= 0.5 + 1e-12
  assert np.abs(centre[:, 0]).max() <= config.lateral_drift_mm + 1e-12
  assert np.abs(centre[:, 1]).max() <= config.axial_drift_mm + 1e-12
  # Measured in the moving probe frame (the training target), the elevational step keeps within
  # [0.1, 0.5] mm up to 0.03 mm (the tilt mixes in a little of the lateral drift).
  relative = np.linalg.inv(tracking[:-1]) @ tracking[1:]
  assert relative[:, 2, 3].min() >= 0.1 - 0.03 and relative[:, 2, 3].max() <= 0.5 + 0.03
  # Smooth: velocities change by little from frame to frame (no jitter).
  assert np.abs(np.diff(centre, n=2, axis=0)).max() < 0.02
  assert np.abs(np.diff(angles, n=2, axis=0)).max() < 0.02


def test_tusrec_sized_frames():
  config = dataclasses.replace(
      simulator.SimulatorConfig(), height=480, width=640,
      pixel_spacing_mm=(0.229389190673828, 0.220979690551758), num_frames=(3, 3))
  out = simulator.simulate_sweep(config, 0)
  assert out['images'].shape == (3, 480, 640)
  np.testing.assert_allclose(out['pixel_to_image'][:2, 3], [-73.28984642, -52.92463589],
                             atol=1e-8)


@pytest.mark.parametrize('field, value, message', [
    ('height', 1, 'SimulatorConfig.height'),
    ('num_frames', (5, 4), 'SimulatorConfig.num_frames'),
    ('num_frames', (1, 4), 'SimulatorConfig.num_frames'),
    ('speed_mm_per_frame', (0.0, 0.5), 'SimulatorConfig.speed_mm_per_frame'),
    ('pixel_spacing_mm', (0.3,), 'SimulatorConfig.pixel_spacing_mm'),
    ('rotation_deg', (1.0, 2.0, 60.0), 'SimulatorConfig.rotation_deg'),
    ('elevational_beam_width_mm', 0.0, 'SimulatorConfig.elevational_beam_width_mm'),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    simulator.SimulatorConfig(**{field: value})


def test_field_size_limit_is_enforced():
  config = dataclasses.replace(SHORT, max_field_mib=0.01)
  with pytest.raises(ValueError, match='max_field_mib'):
    simulator.simulate_sweep(config, 0)


def test_write_dataset_writes_valid_sweeps_and_csv(tmp_path):
  csv_path = simulator.write_dataset(tmp_path / 'data', config=SHORT, num_train=2, num_val=1,
                                     num_test=1, seed=7)
  assert csv_path == str(tmp_path / 'data' / 'metadata.csv')
  records = registry.read_sweep_csv(csv_path)
  assert [(r.sweep_id, r.split) for r in records] == [
      ('train_0000', 'train'), ('train_0001', 'train'), ('val_0000', 'val'),
      ('test_0000', 'test')]
  assert [r.sweep_id for r in registry.read_sweep_csv(csv_path, 'val')] == ['val_0000']
  for record in records:
    sweeps.validate_sweep(record.path)
  # Any sweep can be regenerated alone from the seed stored in the CSV.
  record = records[2]
  seed = tuple(int(s) for s in record.extra['simulator_seed'].split())
  assert seed == simulator.sweep_seed(7, 'val', 0)
  again = simulator.simulate_sweep(SHORT, seed)
  with sweeps.SweepReader(record.path) as reader:
    np.testing.assert_array_equal(reader.images(0, reader.num_frames), again['images'])
    np.testing.assert_array_equal(reader.tracking, again['tracking'])
    np.testing.assert_allclose(reader.pixel_to_image, again['pixel_to_image'])
    np.testing.assert_array_equal(reader.landmarks, again['landmarks'])


def _forbid_simulation(*args, **kwargs):
  raise AssertionError('simulate_sweep must not be called')


def test_ensure_dataset_reuses_the_cache(tmp_path, monkeypatch):
  kwargs = dict(config=SHORT, num_train=1, num_val=1, seed=0)
  csv_path = simulator.ensure_dataset(tmp_path, **kwargs)
  assert os.path.dirname(csv_path) == str(
      tmp_path / f'sim-{simulator.dataset_key(**kwargs)}')
  assert len(registry.read_sweep_csv(csv_path)) == 2
  mtime = os.path.getmtime(csv_path)
  monkeypatch.setattr(simulator, 'simulate_sweep', _forbid_simulation)
  assert simulator.ensure_dataset(tmp_path, **kwargs) == csv_path
  assert os.path.getmtime(csv_path) == mtime
  # Different arguments are a different dataset.
  assert simulator.dataset_key(**kwargs) != simulator.dataset_key(**{**kwargs, 'seed': 1})
  assert simulator.dataset_key(**kwargs) != simulator.dataset_key(
      **{**kwargs, 'config': dataclasses.replace(SHORT, noise_db=-41.0)})


def test_interrupted_generation_is_never_reused(tmp_path, monkeypatch):
  kwargs = dict(config=SHORT, num_train=2, num_val=1, seed=0)
  real = simulator.simulate_sweep
  calls = []

  def crash_on_second_sweep(config, seed):
    calls.append(seed)
    if len(calls) == 2:
      raise KeyboardInterrupt('simulated interruption')
    return real(config, seed)

  monkeypatch.setattr(simulator, 'simulate_sweep', crash_on_second_sweep)
  with pytest.raises(KeyboardInterrupt):
    simulator.ensure_dataset(tmp_path, **kwargs)
  assert os.listdir(tmp_path) == []  # neither a cache folder nor a temporary one is left
  # A temporary folder left by a killed process is not mistaken for the dataset either.
  os.makedirs(tmp_path / f'.tmp-sim-{simulator.dataset_key(**kwargs)}-dead')
  monkeypatch.setattr(simulator, 'simulate_sweep', real)
  csv_path = simulator.ensure_dataset(tmp_path, **kwargs)
  assert len(registry.read_sweep_csv(csv_path)) == 3
  assert len(glob.glob(str(tmp_path / 'sim-*'))) == 1


def test_cli_writes_a_dataset(tmp_path):
  out = tmp_path / 'cli'
  result = subprocess.run(
      [sys.executable, '-m', 'dualtrack_jax.data.simulator', f'--out={out}', '--num_train=1',
       '--num_val=1', '--seed=3', '--height=16', '--width=20', '--num_frames=5,5',
       '--pixel_spacing_mm=0.25,0.2'],
      capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert str(out / 'metadata.csv') in result.stdout and 'frames/s' in result.stdout
  records = registry.read_sweep_csv(out / 'metadata.csv')
  assert [r.split for r in records] == ['train', 'val']
  with sweeps.SweepReader(records[0].path) as reader:
    assert reader.image_shape == (16, 20) and reader.num_frames == 5
    np.testing.assert_allclose(reader.spacing, [0.25, 0.2, 1.0])
