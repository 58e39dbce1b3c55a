"""Tests of dualtrack_jax.metrics against hand-computed values and brute-force materialised DDFs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from dualtrack_jax import metrics, pose
from dualtrack_jax.data import registry, simulator, sweeps, transforms
from dualtrack_jax.experiments import common

H, W, N = 6, 8, 5  # small image and sweep for the brute-force references
SX, SY = 0.5, 0.25


def _pixel_to_image(height=H, width=W, sx=SX, sy=SY):
  """DualTrack's convention: 0-based pixel -> mm, origin at the image centre."""
  return np.array([[sx, 0, 0, -(width - 1) / 2 * sx], [0, sy, 0, -(height - 1) / 2 * sy],
                   [0, 0, 1, 0], [0, 0, 0, 1]])


def _trajectory(seed, num_frames=N, step=(1.0, 2.0)):
  """Global transforms of a random sweep (mm and degree steps of the given scales)."""
  rng = np.random.default_rng(seed)
  steps = np.concatenate([rng.normal(0, step[0], (num_frames - 1, 3)),
                          rng.normal(0, step[1], (num_frames - 1, 3))], -1)
  return pose.compose_relative(pose.pose_vector_to_matrix(steps))


GT = _trajectory(0)
PRED = pose.compose_relative(
    pose.relative_transforms(GT) @ pose.pose_vector_to_matrix(
        np.random.default_rng(1).normal(0, 0.3, (N - 1, 6))))
P2I = _pixel_to_image()
# Rows (f, x, y): frame index, 1-based x and y.
LANDMARKS = np.array([[1, 1, 1], [4, W, H], [2, 3, 5], [4, 7, 2], [3, 1, 6]])


def _translation(t):
  m = np.eye(4)
  m[:3, 3] = t
  return m


def _brute_force_ddf_metrics(pred_glob, gt_glob, pixel_to_image, points):
  """The original's `get_ddf_metrics`: materialise both DDFs, then reduce."""
  homogeneous = np.concatenate([points.T, np.zeros((1, len(points))), np.ones((1, len(points)))])
  q = pixel_to_image @ homogeneous

  def ddf(t):
    return (t @ q)[:, :3] - q[:3]

  inv = np.linalg.inv
  g_pred, g_gt = ddf(pred_glob[1:]), ddf(gt_glob[1:])
  l_pred, l_gt = ddf(inv(pred_glob[:-1]) @ pred_glob[1:]), ddf(inv(gt_glob[:-1]) @ gt_glob[1:])
  g_err = np.linalg.norm(g_pred - g_gt, axis=1).mean(-1)
  l_err = np.linalg.norm(l_pred - l_gt, axis=1).mean(-1)
  rel = (np.linalg.norm(g_pred - g_gt, axis=1) / np.linalg.norm(g_gt, axis=1)).mean(-1)
  return {'avg_global_displacement_error': g_err.mean(),
          'max_global_dislacement_error': g_err.max(),
          'avg_local_displacement_error': l_err.mean(),
          'max_local_displacement_error': l_err.max(),
          'relative_global_err_pct': rel.mean()}


def _all_pixels_x_major(height, width):
  return np.indices((width, height)).transpose(1, 2, 0).reshape(-1, 2).astype(float)


def _official_tusrec(pred_glob, gt_glob, pixel_to_image, image_shape, landmarks):
  """Challenge-style errors: transforms moved to the corner-origin frame, 1-based row-major grid."""
  height, width = image_shape
  scale = np.diag([pixel_to_image[0, 0], pixel_to_image[1, 1], 1, 1])
  # Challenge mm of pixel (u+1, v+1) = DualTrack mm of pixel (u, v) + offset.
  offset = (scale @ [1, 1, 0, 1])[:3] - pixel_to_image[:3, 3]
  c = _translation(offset)

  def to_challenge(g):
    return c @ g @ np.linalg.inv(c)

  n = np.arange(height * width)
  grid = np.stack([n % width + 1, n // width + 1, np.zeros_like(n), np.ones_like(n)]).astype(float)
  sp = scale @ grid

  def dense(t):
    return (t @ sp)[:, :3] - sp[:3]

  def gather(ddf):
    f, x, y = landmarks.T
    return ddf[f - 1, :, (y - 1) * width + (x - 1)].T  # (3, L)

  out = {}
  for prefix, transform in (('G', lambda g: g[1:]),
                            ('L', lambda g: np.linalg.inv(g[:-1]) @ g[1:])):
    d_gt = dense(transform(to_challenge(gt_glob)))
    d_pred = dense(transform(to_challenge(pred_glob)))
    out[f'{prefix}PE'] = np.linalg.norm(d_gt - d_pred, axis=1).mean()
    out[f'{prefix}LE'] = np.linalg.norm(gather(d_gt) - gather(d_pred), axis=0).mean()
    out[f'largest_{prefix}PE'] = np.linalg.norm(d_gt, axis=1).mean()
    out[f'largest_{prefix}LE'] = np.linalg.norm(gather(d_gt), axis=0).mean()
  return out


# 3 frames per chunk: the 4 DDF frames are padded to 6 inside lax.map.
_JIT_DDF_GRID = jax.jit(
    functools.partial(metrics.ddf_errors, image_shape=(H, W), frames_per_chunk=3))
_JIT_DDF_FIVE = jax.jit(functools.partial(metrics.ddf_errors, points=metrics.five_points(W, H)))
_JIT_TUSREC = jax.jit(functools.partial(metrics.tusrec_errors, image_shape=(H, W)))


def test_five_points():
  np.testing.assert_array_equal(metrics.five_points(640, 480),
                                [[0, 0], [640, 0], [0, 480], [640, 480], [320, 240]])


@pytest.mark.parametrize('frames_per_chunk', [None, 1, 3])
def test_ddf_errors_equal_brute_force(frames_per_chunk):
  five = metrics.five_points(W, H)
  for points, where in ((five.astype(float), {'points': five}),
                        (_all_pixels_x_major(H, W), {'image_shape': (H, W)})):
    expected = _brute_force_ddf_metrics(PRED, GT, P2I, points)
    got = metrics.ddf_errors(PRED, GT, P2I, frames_per_chunk=frames_per_chunk, **where)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_sweep_metrics_ddf_keys_equal_brute_force():
  m = metrics.sweep_metrics(PRED, GT, P2I, (H, W), all_pixels=True)
  for prefix, points in (('ddf/5pt-', metrics.five_points(W, H).astype(float)),
                         ('ddf/all-pts-', _all_pixels_x_major(H, W))):
    for key, value in _brute_force_ddf_metrics(PRED, GT, P2I, points).items():
      assert isinstance(m[prefix + key], float)
      np.testing.assert_allclose(m[prefix + key], value, rtol=1e-12, err_msg=key)
  default = metrics.sweep_metrics(PRED, GT, P2I, (H, W))
  assert not any(k.startswith(('ddf/all-pts-', 'tusrec/')) for k in default)


def test_pure_translation_error_is_the_translation():
  t = np.array([0.3, -0.4, 1.2])  # |t| = 1.3
  pred = GT.copy()
  pred[1:, :3, 3] += t
  m = metrics.sweep_metrics(pred, GT, P2I, (H, W), all_pixels=True)
  for family in ('ddf/5pt-', 'ddf/all-pts-'):
    assert m[family + 'avg_global_displacement_error'] == pytest.approx(1.3, abs=1e-12)
    assert m[family + 'max_global_dislacement_error'] == pytest.approx(1.3, abs=1e-12)
    # Only the first local transform changes: frame 1 has error |t|, frames 2..4 none.
    assert m[family + 'avg_local_displacement_error'] == pytest.approx(1.3 / (N - 1), abs=1e-12)
    assert m[family + 'max_local_displacement_error'] == pytest.approx(1.3, abs=1e-12)
  np.testing.assert_allclose([m['mae/x'], m['mae/y'], m['mae/z']], np.abs(t) * (N - 1) / N,
                             atol=1e-12)
  for name in ('pitch', 'roll', 'yaw'):
    assert m[f'mae/{name}'] == pytest.approx(0, abs=1e-10)
  assert m['drift/max_drift'] == pytest.approx(1.3)
  assert m['drift/sum_of_drift'] == pytest.approx(1.3 * (N - 1))


def test_rotation_about_image_centre():
  """No true motion; the prediction rotates by 30 deg about the image-centre z axis."""
  theta = np.deg2rad(30.0)
  gt = np.tile(np.eye(4), (3, 1, 1))
  pred = gt.copy()
  pred[1:] = pose.pose_vector_to_matrix(np.array([0, 0, 0, 0, 0, 30.0]))
  # The five points in centred mm (cx = 3.5 px, cy = 2.5 px; sx = 0.5, sy = 0.25).
  centred = np.array(
      [[-1.75, -0.625], [2.25, -0.625], [-1.75, 0.875], [2.25, 0.875], [0.25, 0.125]])
  expected = 2 * np.sin(theta / 2) * np.hypot(*centred.T).mean()
  got = metrics.ddf_errors(pred, gt, P2I, points=metrics.five_points(W, H))
  assert got['avg_global_displacement_error'] == pytest.approx(expected, rel=1e-12)
  assert got['avg_local_displacement_error'] == pytest.approx(expected / 2, rel=1e-12)


def test_mae_names_follow_the_original():
  """'pitch' is rx, 'roll' ry and 'yaw' rz (DualTrack's names for columns 3, 4, 5)."""
  vectors = pose.matrix_to_pose_vector(GT)
  for column, name in ((3, 'pitch'), (4, 'roll'), (5, 'yaw')):
    shifted = vectors.copy()
    shifted[1:, column] += 0.5
    m = metrics.sweep_metrics(pose.pose_vector_to_matrix(shifted), GT, P2I, (H, W))
    for other in ('x', 'y', 'z', 'pitch', 'roll', 'yaw'):
      expected = 0.5 * (N - 1) / N if other == name else 0.0
      assert m[f'mae/{other}'] == pytest.approx(expected, abs=1e-10), (name, other)


def test_drift_metrics_hand_computed():
  gt = np.stack([_translation([2.0 * i, 0, 0]) for i in range(N)])
  pred = np.stack([_translation([2.2 * i, 0, 0]) for i in range(N)])
  m = metrics.sweep_metrics(pred, gt, P2I, (H, W))
  assert m['drift/final_drift_rate'] == pytest.approx(10.0)
  assert m['drift/avg_drift_rate'] == pytest.approx(10.0)  # frame 0 (0/0) is left out
  assert m['drift/max_drift'] == pytest.approx(0.8)
  assert m['drift/sum_of_drift'] == pytest.approx(0.2 * (1 + 2 + 3 + 4))
  assert m['drift/hausdorff'] == pytest.approx(0.8)


def test_hausdorff_matches_scipy():
  gt, pred = _trajectory(5, num_frames=300), _trajectory(6, num_frames=300)
  u, v = gt[:, :3, 3], pred[:, :3, 3]
  expected = max(directed_hausdorff(u, v)[0], directed_hausdorff(v, u)[0])
  assert metrics.sweep_metrics(pred, gt, P2I, (H, W))['drift/hausdorff'] == pytest.approx(expected)


def test_perfect_and_identity_predictions():
  perfect = metrics.sweep_metrics(GT, GT, P2I, (H, W), all_pixels=True, landmarks=LANDMARKS)
  for key, value in perfect.items():
    if key.startswith(('ddf/', 'mae/', 'drift/')) or key in ('tusrec/GPE', 'tusrec/LLE'):
      assert value == pytest.approx(0, abs=1e-9), key
  assert perfect['tusrec/score'] == pytest.approx(1.0)
  identity = metrics.sweep_metrics(np.tile(np.eye(4), (N, 1, 1)), GT, P2I, (H, W),
                                   landmarks=LANDMARKS)
  for key in ('GPE', 'GLE', 'LPE', 'LLE'):
    assert identity[f'tusrec/{key}'] == pytest.approx(identity[f'tusrec/largest_{key}'], rel=1e-12)
    assert identity[f'tusrec/{key}_score'] == pytest.approx(0, abs=1e-12)
  assert identity['tusrec/score'] == pytest.approx(0, abs=1e-12)


def test_tusrec_errors_equal_official_brute_force():
  """Centred transforms + DualTrack pixel_to_image give the challenge's (corner origin, 1-based)."""
  expected = _official_tusrec(PRED, GT, P2I, (H, W), LANDMARKS)
  got = metrics.tusrec_errors(PRED, GT, P2I, (H, W), LANDMARKS)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-10, err_msg=key)
  m = metrics.sweep_metrics(PRED, GT, P2I, (H, W), landmarks=LANDMARKS)
  for key, value in expected.items():
    np.testing.assert_allclose(m[f'tusrec/{key}'], value, rtol=1e-10, err_msg=key)


def test_landmark_error_is_the_pixel_error():
  """A single landmark's GLE equals the DDF error at that pixel of that frame."""
  f, x, y = 3, 5, 2
  gle = metrics.tusrec_errors(PRED, GT, P2I, (H, W), np.array([[f, x, y]]))['GLE']
  per_frame, _, _ = metrics.displacement_errors(PRED, GT, P2I, points=np.array([[x - 1, y - 1]]))
  assert gle == pytest.approx(per_frame[f], rel=1e-12)


def test_tusrec_scores_hand_computed():
  errors = {'GPE': 1.0, 'largest_GPE': 4.0, 'GLE': 2.0, 'largest_GLE': 4.0,
            'LPE': 0.0, 'largest_LPE': 1.0, 'LLE': 3.0, 'largest_LLE': 2.0}
  s = metrics.tusrec_scores(errors)
  expected = {'GPE_score': 0.75, 'GLE_score': 0.5, 'LPE_score': 1.0, 'LLE_score': -0.5,
              'score': 0.4375, 'global_score': 0.625, 'local_score': 0.25, 'pixel_score': 0.875,
              'landmark_score': 0.0}
  assert s == pytest.approx(expected)


def test_jax_matches_numpy():
  """float32 JAX vs float64 NumPy: agreement to 1e-5 relative."""
  args = tuple(jnp.asarray(a, jnp.float32) for a in (PRED, GT, P2I))
  for fn, where in ((_JIT_DDF_GRID, {'image_shape': (H, W)}),
                    (_JIT_DDF_FIVE, {'points': metrics.five_points(W, H)})):
    expected = metrics.ddf_errors(PRED, GT, P2I, **where)
    got = fn(*args)
    for key, value in expected.items():
      assert got[key].dtype == jnp.float32
      np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
  expected = metrics.tusrec_errors(PRED, GT, P2I, (H, W), LANDMARKS)
  got = _JIT_TUSREC(*args, landmarks=jnp.asarray(LANDMARKS))
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)


def test_jax_matmuls_use_highest_precision():
  x = jnp.zeros((N, 4, 4))
  for fn in (_JIT_DDF_GRID, functools.partial(_JIT_TUSREC, landmarks=jnp.asarray(LANDMARKS))):
    jaxpr = str(jax.make_jaxpr(fn)(x, x, jnp.eye(4)))
    highest = jaxpr.count('precision=(Precision.HIGHEST, Precision.HIGHEST)')
    assert jaxpr.count('dot_general') == highest > 0


def test_full_size_frames_are_chunked():
  """480x640 frames: chunked NumPy == JAX, and compiled JAX temporaries do not grow with N."""
  gt = _trajectory(7, num_frames=4, step=(3.0, 3.0))
  pred = _trajectory(8, num_frames=4, step=(3.0, 3.0))
  p2i = _pixel_to_image(480, 640, 0.229, 0.221)
  one = metrics.ddf_errors(pred, gt, p2i, image_shape=(480, 640), frames_per_chunk=1)
  default = metrics.ddf_errors(pred, gt, p2i, image_shape=(480, 640))
  fn = jax.jit(functools.partial(metrics.ddf_errors, image_shape=(480, 640), frames_per_chunk=1))
  got = fn(*(jnp.asarray(a, jnp.float32) for a in (pred, gt, p2i)))
  for key, value in one.items():
    assert default[key] == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)

  def temp_bytes(num_frames):
    x = jnp.zeros((num_frames, 4, 4), jnp.float32)
    return fn.lower(x, x, jnp.eye(4)).compile().memory_analysis().temp_size_in_bytes

  # A materialised (64,3,H*W) float32 DDF would take 236 MB; one chunk needs a few frame buffers.
  assert temp_bytes(64) < 8 * 480 * 640 * 4
  assert temp_bytes(64) < 1.1 * temp_bytes(16)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r'pred_global\[0\] must be the identity'):
    metrics.sweep_metrics(GT + _translation([5, 0, 0]) - np.eye(4), GT, P2I, (H, W))
  with pytest.raises(ValueError, match='gt_global has 4 frames'):
    metrics.sweep_metrics(PRED, GT[:4], P2I, (H, W))
  with pytest.raises(ValueError, match=r'pred_global must be \(N,4,4\)'):
    metrics.sweep_metrics(PRED[:1], GT[:1], P2I, (H, W))
  with pytest.raises(ValueError, match='gt_global contains NaN'):
    metrics.sweep_metrics(PRED, np.where(np.arange(4) == 3, np.nan, GT), P2I, (H, W))
  with pytest.raises(ValueError, match='pixel_to_image'):
    metrics.sweep_metrics(PRED, GT, P2I[:3], (H, W))
  with pytest.raises(ValueError, match=r'frame must lie in \[1, 4\]'):
    metrics.sweep_metrics(PRED, GT, P2I, (H, W), landmarks=np.array([[0, 1, 1]]))
  with pytest.raises(ValueError, match=r'x must lie in \[1, 8\]'):
    metrics.tusrec_errors(PRED, GT, P2I, (H, W), np.array([[1, 9, 1]]))
  with pytest.raises(ValueError, match='exactly one of points, image_shape'):
    metrics.displacement_errors(PRED, GT, P2I)


def test_sweep_evaluator_adds_all_pixel_and_tusrec_metrics_on_the_evaluated_frames(tmp_path):
  """Whole-sweep evaluation (dualtrack_jax.experiments.common.SweepEvaluator) scores the sweep
  files' landmarks: at spacing 2 those on even frames, renumbered, as sweep_metrics would."""
  config = simulator.SimulatorConfig(height=24, width=32, num_frames=(13, 13))
  records = registry.read_sweep_csv(simulator.write_dataset(
      tmp_path, config=config, num_train=1, num_val=1, seed=0))
  train, val = records[0], records[1]
  offset = np.array([0.05, -0.02, 0.1, 0.3, -0.2, 0.1])

  def predict(item):
    return pose.relative_pose_vectors(item['tracking'][::2]) + offset

  evaluator = common.SweepEvaluator([val], [train], crop=(16, 24), spacing=2)
  got = evaluator(predict).metrics
  without = common.SweepEvaluator([val], [train], crop=(16, 24), spacing=2, full_ddf=False)
  assert not any(k.startswith(('tusrec/', 'ddf/all-pts-')) for k in without(predict).metrics)

  with sweeps.SweepReader(val.path) as reader:
    crop = transforms.center_crop(dict(images=reader.images(0, reader.num_frames),
                                       tracking=reader.tracking,
                                       pixel_to_image=reader.pixel_to_image), (16, 24))
    landmarks = reader.landmarks
  even = landmarks[landmarks[:, 0] % 2 == 0]
  assert 0 < len(even) < len(landmarks)
  even[:, 0] //= 2
  top, left = transforms.center_crop_params((24, 32), (16, 24))
  want = metrics.sweep_metrics(
      common.trajectory(predict(crop)), pose.global_transforms(crop['tracking'][::2]),
      crop['pixel_to_image'] @ common._pixel_translation(-left, -top), (24, 32),
      all_pixels=True, landmarks=even)
  for key in ('tusrec/GPE', 'tusrec/GLE', 'tusrec/LPE', 'tusrec/LLE',
              'ddf/all-pts-avg_global_displacement_error', 'ddf/5pt-avg_global_displacement_error'):
    assert got[key] == pytest.approx(want[key], rel=1e-9), key
