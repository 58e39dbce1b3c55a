"""Tests of dualtrack_jax.pose against SciPy and NumPy linear algebra, in NumPy and JAX."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax import pose

# Middle angles that stress the Euler branches: gimbal lock exactly and just off it.
_NEAR_LOCK_RY = (89.9, -89.9, 90.0, -90.0)


def _random_pose_vectors(n, seed=0):
  """Random pose vectors, the last 4*8 rows with ry at and near gimbal lock."""
  rng = np.random.default_rng(seed)
  v = np.concatenate([rng.normal(0, 50, (n, 3)), rng.uniform(-179, 179, (n, 3))], axis=-1)
  v[:, 4] = rng.uniform(-89, 89, n)
  v[-32:, 4] = np.repeat(_NEAR_LOCK_RY, 8)
  return v


def _scipy_euler(matrices):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # SciPy's gimbal-lock warning.
    return Rotation.from_matrix(np.asarray(matrices, np.float64)[..., :3, :3]).as_euler(
        'xyz', degrees=True)


def _random_rigid(shape, seed=1):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  m = np.tile(np.eye(4), (n, 1, 1))
  m[:, :3, :3] = Rotation.random(n, rng=rng).as_matrix()
  m[:, :3, 3] = rng.normal(0, 100, (n, 3))
  return m.reshape(*shape, 4, 4)


def _angle_diff(a, b):
  return np.abs((a - b + 180) % 360 - 180)


_JIT_VEC_TO_MAT = jax.jit(pose.pose_vector_to_matrix)
_JIT_MAT_TO_VEC = jax.jit(pose.matrix_to_pose_vector)


@pytest.mark.parametrize('dtype,atol', [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_pose_vector_to_matrix_matches_scipy(dtype, atol):
  v = _random_pose_vectors(200).astype(dtype)
  m = pose.pose_vector_to_matrix(v)
  assert m.dtype == dtype and m.shape == (200, 4, 4)
  expected = Rotation.from_euler('xyz', v[:, 3:].astype(np.float64), degrees=True).as_matrix()
  np.testing.assert_allclose(m[:, :3, :3], expected, atol=atol)
  np.testing.assert_array_equal(m[:, :3, 3], v[:, :3])
  np.testing.assert_array_equal(m[:, 3], np.broadcast_to([0, 0, 0, 1], (200, 4)))


def test_matrix_to_pose_vector_matches_scipy_float64():
  m = np.concatenate([_random_rigid((300,)), pose.pose_vector_to_matrix(_random_pose_vectors(64))])
  v = pose.matrix_to_pose_vector(m)
  assert v.dtype == np.float64 and v.shape == (364, 6)
  np.testing.assert_array_equal(v[:, :3], m[:, :3, 3])
  # Raw differences: the branches (ranges of rx, rz and the gimbal-lock split) must be SciPy's.
  np.testing.assert_allclose(v[:, 3:], _scipy_euler(m), atol=1e-8)


def test_matrix_to_pose_vector_matches_scipy_float32():
  m = np.concatenate([_random_rigid((300,)), pose.pose_vector_to_matrix(_random_pose_vectors(64))])
  m = m.astype(np.float32)
  v = pose.matrix_to_pose_vector(m)
  assert v.dtype == np.float32
  # float32 entries near gimbal lock carry ~1e-3 deg of angle noise; wrap so -180 == 180.
  assert _angle_diff(v[:, 3:], _scipy_euler(m)).max() < 5e-3


@pytest.mark.parametrize('ry', [90.0, -90.0])
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_gimbal_lock_convention(ry, dtype):
  v = np.array([[1, 2, 3, 30, ry, 20], [0, 0, 0, 170, ry, -100]], dtype)
  out = pose.matrix_to_pose_vector(pose.pose_vector_to_matrix(v))
  expected = _scipy_euler(pose.pose_vector_to_matrix(v.astype(np.float64)))
  np.testing.assert_allclose(out[:, 3:], expected, atol=1e-9 if dtype == np.float64 else 1e-4)
  # SciPy's convention: third angle 0, rx carries rx - rz at +90 deg and rx + rz at -90 deg.
  np.testing.assert_array_equal(out[:, 5], 0)
  combined = 30 - np.sign(ry) * 20
  np.testing.assert_allclose(out[0, 3], combined, atol=1e-4)


def test_half_turns_match_scipy():
  """Exact half-turns report +180 (SciPy's NumPy backend does not wrap to [-180, 180))."""
  m = np.tile(np.eye(4), (3, 1, 1))
  m[:, :3, :3] = [np.diag([1.0, -1, -1]), np.diag([-1.0, -1, 1]), np.diag([-1.0, 1, -1])]
  out = pose.matrix_to_pose_vector(m)
  np.testing.assert_array_equal(out[:, 3:], _scipy_euler(m))
  np.testing.assert_array_equal(out[:, 3:], [[180, 0, 0], [0, 0, 180], [180, 0, 180]])


def test_gimbal_lock_threshold_float64():
  """Either side of SciPy's 1e-7 rad threshold (1.7e-7 rad off: regular; 1.7e-9 rad off: locked)."""
  ry = np.array([89.99999, -89.99999, 89.9999999, -89.9999999])
  v = np.stack([np.zeros(4), np.zeros(4), np.zeros(4), np.full(4, 30.0), ry, np.full(4, 20.0)], -1)
  out = pose.matrix_to_pose_vector(pose.pose_vector_to_matrix(v))
  np.testing.assert_allclose(out[:, 3:], _scipy_euler(pose.pose_vector_to_matrix(v)), atol=1e-6)
  np.testing.assert_allclose(out[:, 5], [20, 20, 0, 0], atol=1e-6)


@pytest.mark.parametrize('dtype,atol', [(np.float64, 1e-10), (np.float32, 2e-3)])
def test_round_trips(dtype, atol):
  v = _random_pose_vectors(200).astype(dtype)
  regular = np.abs(v[:, 4]) < 90
  back = pose.matrix_to_pose_vector(pose.pose_vector_to_matrix(v[regular]))
  assert _angle_diff(back[:, 3:], v[regular, 3:]).max() < atol * 10
  np.testing.assert_allclose(back[:, :3], v[regular, :3], atol=atol)
  # Matrices (including gimbal lock) survive matrix -> vector -> matrix.
  m = pose.pose_vector_to_matrix(v)
  back = pose.pose_vector_to_matrix(pose.matrix_to_pose_vector(m))
  np.testing.assert_allclose(back, m, atol=atol)


def test_invert_rigid_matches_linalg_inv():
  m = _random_rigid((3, 5))
  np.testing.assert_allclose(pose.invert_rigid(m), np.linalg.inv(m), atol=1e-12)
  np.testing.assert_allclose(pose.invert_rigid(m) @ m, np.broadcast_to(np.eye(4), m.shape),
                             atol=1e-12)


def test_relative_global_and_compose_are_consistent():
  t = _random_rigid((2, 7))
  rel = pose.relative_transforms(t)
  assert rel.shape == (2, 6, 4, 4)
  np.testing.assert_allclose(rel[1, 2], np.linalg.inv(t[1, 2]) @ t[1, 3], atol=1e-12)
  glob = pose.global_transforms(t)
  np.testing.assert_allclose(glob[0, 4], np.linalg.inv(t[0, 0]) @ t[0, 4], atol=1e-12)
  np.testing.assert_allclose(glob[:, 0], np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-12)
  np.testing.assert_allclose(pose.compose_relative(rel), glob, atol=1e-10)


def test_pose_vector_helpers():
  t = _random_rigid((6,))
  expected_rel = _scipy_euler(np.linalg.inv(t[:-1]) @ t[1:])
  rel = pose.relative_pose_vectors(t)
  assert rel.shape == (5, 6)
  np.testing.assert_allclose(rel[:, 3:], expected_rel, atol=1e-8)
  np.testing.assert_allclose(rel[:, :3], (np.linalg.inv(t[:-1]) @ t[1:])[:, :3, 3], atol=1e-10)
  glob = pose.global_pose_vectors(t)
  assert glob.shape == (6, 6)
  np.testing.assert_allclose(glob[0], np.zeros(6), atol=1e-10)
  np.testing.assert_allclose(glob[3, 3:], _scipy_euler(np.linalg.inv(t[0]) @ t[3]), atol=1e-8)


def test_numpy_dtypes():
  assert pose.pose_vector_to_matrix(np.zeros((2, 6), np.float32)).dtype == np.float32
  assert pose.pose_vector_to_matrix([0, 0, 0, 0, 0, 0]).dtype == np.float64
  assert pose.compose_relative(np.tile(np.eye(4, dtype=np.float32), (3, 1, 1))).dtype == np.float32
  assert isinstance(pose.invert_rigid(np.eye(4)), np.ndarray)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='pose_vector_to_matrix.*6'):
    pose.pose_vector_to_matrix(np.zeros((3, 5)))
  with pytest.raises(ValueError, match='invert_rigid.*4,4'):
    pose.invert_rigid(np.zeros((3, 3)))
  with pytest.raises(ValueError, match='compose_relative'):
    pose.compose_relative(np.eye(4))


def test_jax_matches_numpy():
  v = _random_pose_vectors(64).astype(np.float32)
  t = pose.pose_vector_to_matrix(v).reshape(4, 16, 4, 4)
  m_jax = _JIT_VEC_TO_MAT(jnp.asarray(v))
  assert isinstance(m_jax, jax.Array) and m_jax.dtype == jnp.float32
  np.testing.assert_allclose(m_jax, pose.pose_vector_to_matrix(v), atol=1e-6)
  v_jax = _JIT_MAT_TO_VEC(jnp.asarray(t))
  v_np = pose.matrix_to_pose_vector(t)
  assert _angle_diff(np.asarray(v_jax)[..., 3:], v_np[..., 3:]).max() < 1e-3
  tj = jnp.asarray(t)
  for fn in (pose.invert_rigid, pose.relative_transforms, pose.global_transforms):
    np.testing.assert_allclose(jax.jit(fn)(tj), fn(t), rtol=1e-5, atol=1e-4)
  rel = pose.relative_transforms(t)
  np.testing.assert_allclose(jax.jit(pose.compose_relative)(jnp.asarray(rel)),
                             pose.compose_relative(rel), rtol=1e-5, atol=1e-3)


def test_compose_relative_long_sweep_jax():
  """The associative scan equals sequential float64 accumulation over 1000 small steps."""
  rng = np.random.default_rng(3)
  steps = np.concatenate([rng.normal(0.1, 0.05, (999, 3)), rng.normal(0, 0.2, (999, 3))], -1)
  rel = pose.pose_vector_to_matrix(steps)
  expected = pose.compose_relative(rel)
  got = jax.jit(pose.compose_relative)(jnp.asarray(rel, jnp.float32))
  assert got.shape == (1000, 4, 4)
  np.testing.assert_allclose(got[:, :3, :3], expected[:, :3, :3], atol=1e-4)
  np.testing.assert_allclose(got[:, :3, 3], expected[:, :3, 3], atol=2e-3)  # ~100 mm travel


def test_jax_matmuls_use_highest_precision():
  """TF32 on GPUs would cost ~0.05 mm on 100 mm coordinates; every matmul must ask for HIGHEST."""
  x = jnp.zeros((5, 4, 4))
  for fn in (pose.invert_rigid, pose.relative_transforms, pose.global_transforms,
             pose.compose_relative):
    jaxpr = str(jax.make_jaxpr(fn)(x))
    highest = jaxpr.count('precision=(Precision.HIGHEST, Precision.HIGHEST)')
    assert jaxpr.count('dot_general') == highest > 0, fn


def test_grad_and_vmap():
  vectors = _random_pose_vectors(64)
  v = jnp.asarray(vectors[-8:], jnp.float32)  # gimbal lock rows (ry = -90)
  grad = jax.grad(lambda x: jnp.sum(_JIT_VEC_TO_MAT(x) ** 3))(v)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  round_trip = jax.jit(jax.grad(lambda x: jnp.sum(pose.matrix_to_pose_vector(
      pose.pose_vector_to_matrix(x)))))
  assert np.all(np.isfinite(round_trip(v)))
  assert np.all(np.isfinite(round_trip(jnp.asarray(vectors[:8], jnp.float32))))
  batched = jax.vmap(pose.pose_vector_to_matrix)(v.reshape(2, 4, 6))
  np.testing.assert_allclose(batched.reshape(8, 4, 4), _JIT_VEC_TO_MAT(v), atol=1e-6)
