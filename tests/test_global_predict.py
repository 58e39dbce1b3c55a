"""Tests of the global encoder's whole-sweep prediction and of the SLERP helpers in pose.py.

A tiny `global_encoder.py:sim` model with random variables predicts a sweep of 38 frames: the
grid 0, 16, 32 leaves an interpolated interval of 15 frames between grid frames and 5 frames after
the last one, so every case of `Experiment.predict_sweep` is covered with 3 encoded images.
"""
import os

import jax
import numpy as np
import pytest

from dualtrack_jax import pose
from dualtrack_jax.data import sweeps
from dualtrack_jax.experiments import common
from dualtrack_jax.experiments import global_encoder
from launch import config_utils

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'dualtrack',
                      'global_encoder.py')
FRAMES, HEIGHT, WIDTH = 38, 24, 31


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Rotation angles (degrees) of a^-1 b for (..., 4, 4) or (..., 3, 3) transforms."""
  relative = np.swapaxes(a[..., :3, :3], -1, -2) @ b[..., :3, :3]
  cos = (np.trace(relative, axis1=-2, axis2=-1) - 1) / 2
  return np.rad2deg(np.arccos(np.clip(cos, -1, 1)))


@pytest.fixture(scope='module')
def prediction(tmp_path_factory):
  """(experiment, variables, sweep path, predict_sweep's vectors)."""
  config = config_utils.load_config_file(f'{CONFIG}:sim')
  config.data.synthetic.cache_dir = str(tmp_path_factory.mktemp('no_cache'))
  config.model.update(cnn_widths=(4, 4, 8, 8), cnn_stem_width=4, hidden=16, num_layers=1,
                      num_heads=2)
  experiment = global_encoder.Experiment(config, load_data=False)
  assert experiment.spacing == 16
  grid = np.array([0, 16, 32])
  # Random variables of the model's shapes: jax.random init compiles slowly on a busy CPU.
  shapes = jax.eval_shape(experiment.init, jax.random.key(0), {
      'global_images': np.zeros((1, len(grid), 224, 224), np.float32),
      'indices': grid[None].astype(np.int32)})
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if jax.tree_util.keystr(path).endswith("['var']")
                       else rng.uniform(-0.2, 0.2, s.shape).astype(s.dtype)), shapes)
  # The pose head's bias sets the motion between grid frames: a few mm and degrees, so the
  # interpolated rotations are far from the identity.
  head = variables['params']['fc']
  head['bias'] = np.array([2.0, -1.0, 3.0, 5.0, -8.0, 12.0], head['bias'].dtype)
  path = str(tmp_path_factory.mktemp('sweep') / 'sweep.h5')
  tracking = np.broadcast_to(np.eye(4), (FRAMES, 4, 4))
  sweeps.write_sweep(
      path, images=rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH), dtype=np.uint8),
      tracking=tracking, spacing=(0.3, 0.3, 1),
      pixel_to_image=[[0.3, 0, 0, -4.5], [0, 0.3, 0, -3.45], [0, 0, 1, 0], [0, 0, 0, 1]])
  with sweeps.SweepReader(path) as reader:
    vectors = experiment.predict_sweep(variables, reader)
  return experiment, variables, path, vectors


def test_grid_frames_keep_the_encoders_own_poses(prediction):
  experiment, variables, path, vectors = prediction
  # N - 1 vectors for N = 38, not a multiple of the grid spacing.
  assert vectors.shape == (FRAMES - 1, 6) and vectors.dtype == np.float64
  grid = np.array([0, 16, 32])
  with sweeps.SweepReader(path) as reader:
    global_images = common.global_frames(reader, 'resize', grid)
  # The evaluation code path: `predict` on a whole-sweep item (its local crops are not read).
  item = dict(images=np.zeros((FRAMES, 1, 1), np.uint8), global_images=global_images)
  at_grid = common.trajectory(experiment.predict(variables, item))
  globals_ = common.trajectory(vectors)
  np.testing.assert_allclose(globals_[grid], at_grid, atol=1e-9)
  # The motions are large enough for the interpolation to matter.
  assert np.all(_angle_deg(at_grid[:-1], at_grid[1:]) > 5)


def test_frames_between_grid_frames_are_interpolated(prediction):
  *_, vectors = prediction
  globals_ = common.trajectory(vectors)
  for a, b in ((0, 16), (16, 32)):
    total = _angle_deg(globals_[a], globals_[b])
    for i in range(a + 1, b):
      t = (i - a) / (b - a)
      # Translation on the segment, at the frame's fraction of it.
      np.testing.assert_allclose(globals_[i, :3, 3],
                                 (1 - t) * globals_[a, :3, 3] + t * globals_[b, :3, 3],
                                 atol=1e-9)
      # Rotation on the geodesic from a to b (the two angles add up), at the same fraction.
      from_a, to_b = _angle_deg(globals_[a], globals_[i]), _angle_deg(globals_[i], globals_[b])
      np.testing.assert_allclose([from_a, to_b], [t * total, (1 - t) * total], atol=1e-6)
  # Consecutive interpolated frames move by the same amount.
  steps = _angle_deg(globals_[:15], globals_[1:16])
  np.testing.assert_allclose(steps, steps[0], atol=1e-6)


def test_frames_after_the_last_grid_frame_continue_its_motion(prediction):
  *_, vectors = prediction
  globals_ = common.trajectory(vectors)
  a, b = globals_[16], globals_[32]
  total = _angle_deg(a, b)
  for i in range(33, FRAMES):
    s = (i - 32) / 16
    np.testing.assert_allclose(globals_[i, :3, 3], b[:3, 3] + s * (b[:3, 3] - a[:3, 3]),
                               atol=1e-9)
    np.testing.assert_allclose(_angle_deg(b, globals_[i]), s * total, atol=1e-6)
    np.testing.assert_allclose(_angle_deg(a, globals_[i]), (1 + s) * total, atol=1e-6)
  # Every frame of the last interval and after it turns by the same relative rotation (the
  # relative translations differ: the translation is linear in frame 0's coordinates).
  np.testing.assert_allclose(vectors[16:, 3:], np.broadcast_to(vectors[16, 3:], (FRAMES - 17, 3)),
                             atol=1e-9)


def test_a_sweep_within_one_grid_interval_has_no_motion(prediction, tmp_path):
  experiment, variables, *_ = prediction
  path = str(tmp_path / 'short.h5')
  sweeps.write_sweep(path, images=np.zeros((16, HEIGHT, WIDTH), np.uint8),
                     tracking=np.broadcast_to(np.eye(4), (16, 4, 4)), spacing=(0.3, 0.3, 1),
                     pixel_to_image=np.eye(4))
  with sweeps.SweepReader(path) as reader:
    vectors = experiment.predict_sweep(variables, reader)
  np.testing.assert_array_equal(vectors, np.zeros((15, 6)))


def _rotation_z(degrees: float) -> np.ndarray:
  m = np.eye(4)
  c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
  m[:2, :2] = [[c, -s], [s, c]]
  return m


def test_interpolate_rigid_on_known_rotations():
  a, b = np.eye(4), _rotation_z(90)
  b[:3, 3] = [4.0, -2.0, 6.0]
  t = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
  out = pose.interpolate_rigid(np.broadcast_to(a, (5, 4, 4)), np.broadcast_to(b, (5, 4, 4)), t)
  for got, degrees in zip(out, (0, 45, 90, 135, 180)):
    np.testing.assert_allclose(got[:3, :3], _rotation_z(degrees)[:3, :3], atol=1e-12)
  np.testing.assert_allclose(out[:, :3, 3], t[:, None] * [4.0, -2.0, 6.0], atol=1e-12)
  # The shorter arc: from 170 to -170 degrees about z passes 180, not 0.
  half = pose.interpolate_rigid(_rotation_z(170), _rotation_z(-170), 0.5)
  np.testing.assert_allclose(half, _rotation_z(180), atol=1e-12)


def test_quaternions_round_trip_including_half_turns():
  rng = np.random.default_rng(1)
  vectors = np.concatenate([rng.uniform(-180, 180, (200, 6)),
                            [[0, 0, 0, 180, 0, 0], [0, 0, 0, 0, 0, 180], [0, 0, 0, 180, 0, 90],
                             [0, 0, 0, 0, 90, 0]]])
  rotations = pose.pose_vector_to_matrix(vectors)[:, :3, :3]
  q = pose.rotation_to_quaternion(rotations)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1, atol=1e-12)
  assert np.all(q[:, 0] >= 0)
  np.testing.assert_allclose(pose.quaternion_to_rotation(q), rotations, atol=1e-12)
  # 90 degrees about z is (cos 45, 0, 0, sin 45).
  np.testing.assert_allclose(pose.rotation_to_quaternion(_rotation_z(90)[:3, :3]),
                             [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-15)
  # SLERP between equal rotations (the small-angle branch) returns them.
  np.testing.assert_allclose(pose.slerp(q[:3], q[:3], 0.3), q[:3], atol=1e-12)
