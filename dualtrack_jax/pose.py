"""Rigid pose math shared by NumPy (host, float64) and JAX (jit/grad/vmap) code.

Conventions (DualTrack, `src/utils/pose.py` of the original):
- A pose vector is `[tx, ty, tz, rx, ry, rz]`: translation in mm, angles in degrees, SciPy's
  extrinsic "xyz" Euler convention, i.e. `R = Rz(rz) @ Ry(ry) @ Rx(rx)`.
- "Absolute" transforms `T_i` map frame-i image coordinates (mm) to world.
- "Global" transforms `G_i = T_0^-1 T_i` map frame i into frame 0 (`G_0 = I`).
- "Relative" (local) transforms `rel_k = T_k^-1 T_{k+1}` map frame k+1 into frame k.

Every function dispatches on its input: JAX arrays (and tracers) are processed with `jax.numpy`,
anything else with NumPy, which keeps the input's floating dtype (integers become float64). All
functions are batched over leading axes.
"""
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

# SciPy's threshold (radians) on the middle Euler angle for declaring gimbal lock.
_GIMBAL_LOCK_EPS = 1e-7


def array_namespace(*arrays) -> ModuleType:
  """Returns `jax.numpy` if any argument is a JAX array or tracer, else `numpy`."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _as_float(x):
  """Returns (namespace, x as a floating array); NumPy integers become float64."""
  xp = array_namespace(x)
  x = xp.asarray(x)
  if not xp.issubdtype(x.dtype, xp.floating):
    x = x.astype(xp.float64 if xp is np else jnp.result_type(float))
  return xp, x


def matmul(a, b):
  """Matrix product; under JAX at HIGHEST precision (TF32 costs ~0.05 mm on 100 mm coordinates)."""
  if array_namespace(a, b) is jnp:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return np.matmul(a, b)


def _homogeneous(xp, rotation, translation):
  """Assembles (...,4,4) rigid matrices from (...,3,3) rotations and (...,3) translations."""
  top = xp.concatenate([rotation, translation[..., None]], axis=-1)
  bottom = xp.broadcast_to(
      xp.asarray([0, 0, 0, 1], dtype=rotation.dtype), (*rotation.shape[:-2], 1, 4))
  return xp.concatenate([top, bottom], axis=-2)


def _check_matrices(m, name):
  if m.ndim < 2 or m.shape[-2:] != (4, 4):
    raise ValueError(
        f'dualtrack_jax.pose.{name}: expected (...,4,4) matrices, got shape {m.shape}')


def pose_vector_to_matrix(v):
  """(...,6) pose vectors `[tx,ty,tz mm, rx,ry,rz deg]` -> (...,4,4) rigid matrices."""
  xp, v = _as_float(v)
  if v.shape[-1:] != (6,):
    raise ValueError(
        f'dualtrack_jax.pose.pose_vector_to_matrix: expected (...,6), got shape {v.shape}')
  angles = xp.deg2rad(v[..., 3:])
  cx, cy, cz = (xp.cos(angles[..., i]) for i in range(3))
  sx, sy, sz = (xp.sin(angles[..., i]) for i in range(3))
  # Rz @ Ry @ Rx written out (the same entries as SciPy's from_euler("xyz")).
  rotation = xp.stack([
      cy * cz, cz * sx * sy - cx * sz, sx * sz + cx * cz * sy,
      cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - cz * sx,
      -sy, cy * sx, cx * cy,
  ], axis=-1).reshape(*v.shape[:-1], 3, 3)
  return _homogeneous(xp, rotation, v[..., :3])


def matrix_to_pose_vector(m):
  """(...,4,4) rigid matrices -> (...,6) pose vectors, as SciPy `as_euler("xyz", degrees=True)`.

  Branches follow SciPy's NumPy backend: ry in [-90, 90], rx and rz in [-180, 180]. A half-turn
  with exact zero entries gives +180 as in SciPy, but an rx or rz within rounding of +-180 may get
  the opposite sign from SciPy's quaternion path (the same rotation). At gimbal lock (|ry| within
  SciPy's 1e-7 rad of 90 deg) rz is set to 0 and rx carries the remaining rotation. SciPy decides
  gimbal lock on its quaternion, we decide it on the matrix, so within rounding of the threshold
  the split between rx and rz may differ (the matrix is the same). Gradients are finite everywhere.
  """
  xp, m = _as_float(m)
  _check_matrices(m, 'matrix_to_pose_vector')
  r = m[..., :3, :3]
  r00, r01, r10, r11 = r[..., 0, 0], r[..., 0, 1], r[..., 1, 0], r[..., 1, 1]
  r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
  cos_y_sq = r00 * r00 + r10 * r10
  # Guarded square root: sqrt'(0) is infinite and would poison gradients through xp.where.
  cos_y = xp.sqrt(xp.where(cos_y_sq > 0, cos_y_sq, 1)) * (cos_y_sq > 0)
  ry = xp.arctan2(-r20, cos_y)
  # cos(ry) is the distance (radians) of ry from +-90 deg.
  locked = cos_y <= _GIMBAL_LOCK_EPS
  # Regular case: R21 = cy sx, R22 = cy cx, R10 = cy sz, R00 = cy cz. The inputs of the unused
  # branch are replaced by safe values so that atan2(0, 0) never appears in a gradient.
  rx_regular = xp.arctan2(xp.where(locked, 0, r21), xp.where(locked, 1, r22))
  rz = xp.arctan2(xp.where(locked, 0, r10), xp.where(locked, 1, r00))
  # Locked (rz = 0): R01 = sin(rx - rz), R11 = cos(rx - rz) at ry = +90, R01 = -sin(rx + rz) at -90.
  rx_locked = xp.arctan2(xp.sign(-r20) * r01, r11)
  rx = xp.where(locked, rx_locked, rx_regular)
  angles = xp.stack([rx, ry, rz], axis=-1)
  return xp.concatenate([m[..., :3, 3], xp.rad2deg(angles)], axis=-1)


def invert_rigid(m):
  """(...,4,4) rigid matrices -> their inverses `[R^T, -R^T t]` (exact for rigid input)."""
  xp, m = _as_float(m)
  _check_matrices(m, 'invert_rigid')
  rotation_t = xp.swapaxes(m[..., :3, :3], -1, -2)
  translation = -matmul(rotation_t, m[..., :3, 3:])[..., 0]
  return _homogeneous(xp, rotation_t, translation)


def relative_transforms(t):
  """(...,N,4,4) absolute transforms -> (...,N-1,4,4) with `rel_k = t_k^-1 t_{k+1}`."""
  _, t = _as_float(t)
  _check_matrices(t, 'relative_transforms')
  return matmul(invert_rigid(t[..., :-1, :, :]), t[..., 1:, :, :])


def global_transforms(t):
  """(...,N,4,4) absolute transforms -> (...,N,4,4) with `G_i = t_0^-1 t_i` (`G_0 = I`)."""
  _, t = _as_float(t)
  _check_matrices(t, 'global_transforms')
  return matmul(invert_rigid(t[..., :1, :, :]), t)


def compose_relative(rel):
  """(...,N-1,4,4) relative transforms -> (...,N,4,4) globals: `G_0 = I`, `G_{k+1} = G_k rel_k`.

  JAX uses an associative scan (log-depth, for sweeps of thousands of frames inside jitted steps);
  NumPy accumulates sequentially in the input dtype, like the original.
  """
  xp, rel = _as_float(rel)
  _check_matrices(rel, 'compose_relative')
  if rel.ndim < 3:
    raise ValueError(
        f'dualtrack_jax.pose.compose_relative: expected (...,N-1,4,4), got shape {rel.shape}')
  eye = xp.broadcast_to(xp.eye(4, dtype=rel.dtype), (*rel.shape[:-3], 1, 4, 4))
  if xp is jnp:
    # The scan combines an earlier prefix `a` with a later block `b`, hence a @ b.
    prefix = jax.lax.associative_scan(matmul, rel, axis=rel.ndim - 3)
    return jnp.concatenate([eye, prefix], axis=-3)
  out = [eye[..., 0, :, :]]
  for k in range(rel.shape[-3]):
    out.append(out[-1] @ rel[..., k, :, :])
  return np.stack(out, axis=-3)


def relative_pose_vectors(t):
  """(...,N,4,4) absolute tracking -> (...,N-1,6) pose vectors of `t_k^-1 t_{k+1}` (targets)."""
  return matrix_to_pose_vector(relative_transforms(t))


def global_pose_vectors(t):
  """(...,N,4,4) absolute tracking -> (...,N,6) pose vectors of `G_i = t_0^-1 t_i`."""
  return matrix_to_pose_vector(global_transforms(t))


def rotation_to_quaternion(r):
  """(...,3,3) rotation matrices -> (...,4) unit quaternions `[w, x, y, z]` with w >= 0.

  Shepperd's method: of the four candidate formulas, each dividing by one of 4w^2, 4x^2, 4y^2,
  4z^2 (= 1 + trace, 1 + 2 R00 - trace, ...), the one with the largest divisor is used; those add
  up to 4, so it is at least 1 and the result is accurate near half-turns too.
  """
  xp, r = _as_float(r)
  if r.ndim < 2 or r.shape[-2:] != (3, 3):
    raise ValueError(f'dualtrack_jax.pose.rotation_to_quaternion: expected (...,3,3), got shape '
                     f'{r.shape}')
  r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
  r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
  r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
  trace = r00 + r11 + r22
  squares = xp.stack([1 + trace, 1 + 2 * r00 - trace, 1 + 2 * r11 - trace, 1 + 2 * r22 - trace],
                     axis=-1)
  # The candidates not used may have tiny or negative divisors: floored at 1, which the used one
  # always reaches, so no candidate overflows or takes the square root of a negative number.
  s = 2 * xp.sqrt(xp.maximum(squares, 1))
  s_w, s_x, s_y, s_z = (s[..., i] for i in range(4))
  candidates = xp.stack([
      xp.stack([s_w / 4, (r21 - r12) / s_w, (r02 - r20) / s_w, (r10 - r01) / s_w], axis=-1),
      xp.stack([(r21 - r12) / s_x, s_x / 4, (r01 + r10) / s_x, (r02 + r20) / s_x], axis=-1),
      xp.stack([(r02 - r20) / s_y, (r01 + r10) / s_y, s_y / 4, (r12 + r21) / s_y], axis=-1),
      xp.stack([(r10 - r01) / s_z, (r02 + r20) / s_z, (r12 + r21) / s_z, s_z / 4], axis=-1),
  ], axis=-2)
  best = xp.argmax(squares, axis=-1)[..., None, None]
  q = xp.take_along_axis(candidates, best, axis=-2)[..., 0, :]
  q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
  return xp.where(q[..., :1] < 0, -q, q)


def quaternion_to_rotation(q):
  """(...,4) quaternions `[w, x, y, z]` (normalised here) -> (...,3,3) rotation matrices."""
  xp, q = _as_float(q)
  if q.shape[-1:] != (4,):
    raise ValueError(f'dualtrack_jax.pose.quaternion_to_rotation: expected (...,4), got shape '
                     f'{q.shape}')
  q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
  w, x, y, z = (q[..., i] for i in range(4))
  return xp.stack([
      1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
      2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
      2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
  ], axis=-1).reshape(*q.shape[:-1], 3, 3)


def slerp(q0, q1, t):
  """Spherical linear interpolation of unit quaternions (...,4) at fractions t (...).

  The shorter arc is taken (q1 and -q1 are the same rotation). t = 0 gives q0's rotation, t = 1
  q1's, t outside [0, 1] continues along the same great circle: the rotation from q0 to q1 keeps
  turning about the same axis at the same rate. Arcs below 1e-6 rad fall back to normalised
  linear interpolation, which equals SLERP there to rounding.
  """
  xp, q0 = _as_float(q0)
  q1 = xp.asarray(q1, q0.dtype)
  t = xp.asarray(t, q0.dtype)[..., None]
  dot = xp.sum(q0 * q1, axis=-1, keepdims=True)
  q1 = xp.where(dot < 0, -q1, q1)
  angle = xp.arccos(xp.clip(xp.abs(dot), 0, 1))
  small = angle < 1e-6
  sin_angle = xp.sin(xp.where(small, 1, angle))
  w0 = xp.where(small, 1 - t, xp.sin((1 - t) * angle) / sin_angle)
  w1 = xp.where(small, t, xp.sin(t * angle) / sin_angle)
  q = w0 * q0 + w1 * q1
  return q / xp.linalg.norm(q, axis=-1, keepdims=True)


def interpolate_rigid(a, b, t):
  """Rigid transforms between (...,4,4) `a` (t = 0) and `b` (t = 1) at fractions t (...).

  Translation linearly, rotation by `slerp`; t outside [0, 1] extrapolates both (constant velocity
  of the translation, constant rotation rate about the same axis).
  """
  xp, a = _as_float(a)
  b = xp.asarray(b, a.dtype)
  _check_matrices(a, 'interpolate_rigid')
  _check_matrices(b, 'interpolate_rigid')
  t = xp.asarray(t, a.dtype)
  rotation = quaternion_to_rotation(slerp(rotation_to_quaternion(a[..., :3, :3]),
                                          rotation_to_quaternion(b[..., :3, :3]), t))
  translation = (1 - t[..., None]) * a[..., :3, 3] + t[..., None] * b[..., :3, 3]
  return _homogeneous(xp, rotation, translation)
