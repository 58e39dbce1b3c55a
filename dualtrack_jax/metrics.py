"""Tracking metrics: DualTrack's evaluator (`src/evaluator.py`) and the official TUS-REC errors.

Inputs are per-sweep *global* transforms `G_i` (N,4,4), `G_0 = I`, mapping frame-i image mm into
frame-0 image mm, and the sweep's `pixel_to_image` (4,4) mapping a 0-based pixel
`(u=column, v=row, 0, 1)` to image mm. Local transforms are derived as `L_i = G_{i-1}^-1 G_i`.
Frame 0 is excluded from every DDF metric.

For a transform `T` and a pixel `q = pixel_to_image @ p` the displacement is `D(p) = (T q - q)_xyz`,
so `D_pred - D_gt = ((G_pred - G_gt) q)_xyz`: no DDF is ever materialised. Each frame's error field
is affine in `(u, v)` and is evaluated over chunks of frames. NumPy inputs are computed in float64;
JAX inputs in their own dtype (float32 unless x64 is enabled) with HIGHEST-precision matmuls, and
the JAX path is jit-able.

TUS-REC uses 1-based pixels `(x, y)` in a corner-origin image frame. DDFs are invariant to a pure
translation of the image origin, so DualTrack's centred transforms with the sweep's DualTrack
`pixel_to_image` give the official values, challenge pixel `(x, y)` being our 0-based pixel
`(x - 1, y - 1)`. (For transforms in the challenge's own frame pass `S @ translation(1, 1, 0)`.)
"""
import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax.pose import array_namespace, matmul, matrix_to_pose_vector, relative_transforms

# Pixel evaluations per chunk of frames (~1M: three 480x640 frames); bounds the temporaries.
_POINTS_PER_CHUNK = 1 << 20
# Names of the pose-vector columns in the original's 'mae/*' keys (rx 'pitch', ry 'roll', rz 'yaw').
_MAE_NAMES = ('x', 'y', 'z', 'pitch', 'roll', 'yaw')
_TUSREC_ERRORS = ('GPE', 'GLE', 'LPE', 'LLE')


def five_points(width: int, height: int) -> np.ndarray:
  """The evaluator's 5 pixel points (x, y), 0-based: corners (one past the last pixel), centre."""
  return np.array(
      [[0, 0], [width, 0], [0, height], [width, height], [width // 2, height // 2]])


def _namespace_and_dtype(*arrays):
  """NumPy computes in float64; JAX in float32 or the (x64) input precision."""
  xp = array_namespace(*arrays)
  if xp is np:
    return np, np.float64
  return jnp, jnp.result_type(jnp.float32, jnp.asarray(arrays[0]).dtype)


def _coefficients(xp, diff, pixel_to_image):
  """(...,4,4) `diff` -> (...,3,3) `C`, `(diff @ pixel_to_image @ (u,v,0,1))_xyz = C (u,v,1)`."""
  m = matmul(diff, pixel_to_image)
  return xp.stack([m[..., :3, 0], m[..., :3, 1], m[..., :3, 3]], axis=-1)


def _norms(xp, coef, u, v):
  """`||C (u, v, 1)||` for coefficients (...,3,3) broadcast against pixel coordinates u, v (...)."""
  field = coef[..., 0] * u[..., None] + coef[..., 1] * v[..., None] + coef[..., 2]
  return xp.sqrt(xp.sum(field * field, axis=-1))


def _grid_norms(xp, coef, height, width):
  """`||C (u, v, 1)||` over the pixel grid for coefficients (F,3,3) -> (F,H,W).

  Separable: component k is (c0 + v cv)_k [row] + (u cu)_k [column], one add per pixel.
  """
  dtype = coef.dtype
  rows = coef[:, None, :, 2] + xp.arange(height, dtype=dtype)[:, None] * coef[:, None, :, 1]
  cols = xp.arange(width, dtype=dtype)[:, None] * coef[:, None, :, 0]  # (F,W,3)
  sq = 0
  for k in range(3):
    component = rows[:, :, None, k] + cols[:, None, :, k]
    sq = sq + component * component
  return xp.sqrt(sq)


def displacement_errors(pred, gt, pixel_to_image, *, points=None, image_shape=None,
                        frames_per_chunk: int | None = None):
  """Per-frame DDF errors of transforms `pred` vs `gt` (each (M,4,4), frame -> reference frame).

  Args:
    pred: (M,4,4) predicted transforms; NumPy (computed in float64) or JAX (jit-able).
    gt: (M,4,4) true transforms.
    pixel_to_image: (4,4) 0-based pixel -> image mm.
    points: (P,2) 0-based pixel (x, y) points; or
    image_shape: (H, W) for every pixel (a row-major grid).
    frames_per_chunk: frames evaluated together (bounds memory); default ~1M pixel evaluations.

  Returns:
    (error, relative_error, gt_norm), each (M,): per frame the means over the points of
    `||D_pred - D_gt||` (mm), `||D_pred - D_gt|| / ||D_gt||` and `||D_gt||` (mm), where
    `D(p) = (T q - q)_xyz`, `q = pixel_to_image @ (x, y, 0, 1)`.
  """
  if (points is None) == (image_shape is None):
    raise ValueError(
        'dualtrack_jax.metrics.displacement_errors: pass exactly one of points, image_shape')
  xp, dtype = _namespace_and_dtype(pred, gt, pixel_to_image)
  pred, gt, pixel_to_image = (xp.asarray(a, dtype=dtype) for a in (pred, gt, pixel_to_image))
  if image_shape is not None:
    height, width = (int(s) for s in image_shape)
    num_points = height * width
    norms = lambda coef: _grid_norms(xp, coef, height, width)
    # Row means first: short float32 sums (307,200 terms in one float32 sum lose digits).
    mean = lambda x: x.mean(-1).mean(-1)
  else:
    points = xp.asarray(points, dtype=dtype)
    num_points = points.shape[0]
    norms = lambda coef: _norms(xp, coef[:, None], points[:, 0], points[:, 1])
    mean = lambda x: x.mean(-1)

  def chunk_means(coef_err, coef_gt):  # (F,3,3) each -> (3, F)
    err, true = norms(coef_err), norms(coef_gt)
    # |D_gt| = 0 gives inf/nan relative errors, as in the original.
    return xp.stack([mean(err), mean(err / true), mean(true)])

  coef_err = _coefficients(xp, pred - gt, pixel_to_image)
  coef_gt = _coefficients(xp, gt - xp.eye(4, dtype=dtype), pixel_to_image)
  num_frames = pred.shape[0]
  chunk = frames_per_chunk or max(1, _POINTS_PER_CHUNK // num_points)
  chunk = max(1, min(chunk, num_frames))
  if xp is np:
    with np.errstate(divide='ignore', invalid='ignore'):
      stats = np.concatenate([chunk_means(coef_err[s:s + chunk], coef_gt[s:s + chunk])
                              for s in range(0, num_frames, chunk)], axis=1)
  else:
    # Fixed-size chunks under lax.map; padded frames (zero coefficients) are dropped afterwards.
    num_chunks = -(-num_frames // chunk)
    pad = ((0, num_chunks * chunk - num_frames), (0, 0), (0, 0))
    coefs = tuple(jnp.pad(c, pad).reshape(num_chunks, chunk, 3, 3) for c in (coef_err, coef_gt))
    stats = jax.lax.map(lambda c: chunk_means(*c), coefs)
    stats = jnp.moveaxis(stats, 1, 0).reshape(3, -1)[:, :num_frames]
  return stats[0], stats[1], stats[2]


def _ddf_frame_stats(pred_global, gt_global, pixel_to_image, **where):
  """Per-frame global and local error statistics (frames 1..N-1)."""
  g_err, g_rel, g_norm = displacement_errors(
      pred_global[1:], gt_global[1:], pixel_to_image, **where)
  l_err, _, l_norm = displacement_errors(
      relative_transforms(pred_global), relative_transforms(gt_global), pixel_to_image, **where)
  return dict(global_error=g_err, global_relative=g_rel, global_norm=g_norm,
              local_error=l_err, local_norm=l_norm)


def _ddf_summary(stats):
  # Key names (and the 'dislacement' typo) as in DualTrack's `get_ddf_metrics`.
  return {
      'avg_global_displacement_error': stats['global_error'].mean(),
      'max_global_dislacement_error': stats['global_error'].max(),
      'avg_local_displacement_error': stats['local_error'].mean(),
      'max_local_displacement_error': stats['local_error'].max(),
      # A mean ratio, not a percentage, despite the name.
      'relative_global_err_pct': stats['global_relative'].mean(),
  }


def ddf_errors(pred_global, gt_global, pixel_to_image, *, points=None, image_shape=None,
               frames_per_chunk: int | None = None) -> dict:
  """DualTrack's DDF metrics of one sweep (keys without the 'ddf/5pt-' or 'ddf/all-pts-' prefix).

  Args:
    pred_global: (N,4,4) predicted global transforms, `G_0 = I`; NumPy or JAX (jit-able).
    gt_global: (N,4,4) true global transforms.
    pixel_to_image: (4,4) 0-based pixel -> image mm.
    points: (P,2) pixel points, e.g. `five_points(W, H)`; or
    image_shape: (H, W) for all pixels.
    frames_per_chunk: see `displacement_errors`.

  Returns:
    Scalars: mean and max over frames 1..N-1 of the per-frame mean global / local displacement
    error (mm), and the mean relative global error (a ratio; inf/nan where a true displacement
    is 0).
  """
  return _ddf_summary(_ddf_frame_stats(
      pred_global, gt_global, pixel_to_image, points=points, image_shape=image_shape,
      frames_per_chunk=frames_per_chunk))


def _check_landmarks(landmarks, num_frames, image_shape):
  """Validates concrete (f, x, y) landmarks: integers, 1 <= f <= N-1, 1 <= x <= W, 1 <= y <= H."""
  landmarks = np.asarray(landmarks)
  name = 'dualtrack_jax.metrics: landmarks'
  if landmarks.ndim != 2 or landmarks.shape[1] != 3 or not len(landmarks):
    raise ValueError(f'{name} must be (L,3) rows (frame, x, y), L >= 1, got {landmarks.shape}')
  if not np.all(np.isfinite(landmarks)) or not np.array_equal(landmarks, np.round(landmarks)):
    raise ValueError(f'{name} must hold integers (frame, x, y)')
  height, width = image_shape
  for column, label, high in ((0, 'frame', num_frames - 1), (1, 'x', width), (2, 'y', height)):
    values = landmarks[:, column]
    if values.min() < 1 or values.max() > high:
      raise ValueError(
          f'{name}: {label} must lie in [1, {high}], got [{values.min()}, {values.max()}]')


def _landmark_errors(pred_global, gt_global, pixel_to_image, landmarks):
  """GLE, LLE and their identity-prediction values for landmarks (f, x, y), x and y 1-based."""
  xp, dtype = _namespace_and_dtype(pred_global, gt_global, pixel_to_image, landmarks)
  pred_global, gt_global, pixel_to_image = (
      xp.asarray(a, dtype=dtype) for a in (pred_global, gt_global, pixel_to_image))
  landmarks = xp.asarray(landmarks)
  frame = landmarks[:, 0].astype(np.int32)
  u, v = (landmarks[:, 1] - 1).astype(dtype), (landmarks[:, 2] - 1).astype(dtype)
  eye = xp.eye(4, dtype=dtype)
  out = {}
  # The local transform of frame f is relative_transforms(...)[f - 1] = G_{f-1}^-1 G_f.
  for key, pred, gt in (
      ('GLE', pred_global[frame], gt_global[frame]),
      ('LLE', relative_transforms(pred_global)[frame - 1],
       relative_transforms(gt_global)[frame - 1])):
    out[key] = _norms(xp, _coefficients(xp, pred - gt, pixel_to_image), u, v).mean()
    out[f'largest_{key}'] = _norms(xp, _coefficients(xp, gt - eye, pixel_to_image), u, v).mean()
  return out


def _tusrec_from(stats, landmark_errors):
  return {
      'GPE': stats['global_error'].mean(), 'GLE': landmark_errors['GLE'],
      'LPE': stats['local_error'].mean(), 'LLE': landmark_errors['LLE'],
      'largest_GPE': stats['global_norm'].mean(), 'largest_GLE': landmark_errors['largest_GLE'],
      'largest_LPE': stats['local_norm'].mean(), 'largest_LLE': landmark_errors['largest_LLE'],
  }


def tusrec_errors(pred_global, gt_global, pixel_to_image, image_shape, landmarks, *,
                  frames_per_chunk: int | None = None) -> dict:
  """Official TUS-REC per-scan errors GPE, GLE, LPE, LLE (mm) and those of an identity prediction.

  Args:
    pred_global: (N,4,4) predicted global transforms (`G_0 = I`) in the frame of `pixel_to_image`;
      NumPy (float64) or JAX (jit-able; the landmarks are then not range-checked).
    gt_global: (N,4,4) true global transforms.
    pixel_to_image: (4,4) 0-based pixel -> image mm (DualTrack's sweep field; see the module doc).
    image_shape: (H, W); GPE and LPE use all H*W pixels of frames 1..N-1.
    landmarks: (L,3) integer rows (f, x, y) as in the challenge files: f the 0-based frame index,
      1 <= f <= N-1; x, y 1-based pixel coordinates.
    frames_per_chunk: see `displacement_errors`.

  Returns:
    'GPE', 'GLE', 'LPE', 'LLE' and 'largest_GPE', ...: the errors of an identity prediction (a
    zero DDF), which normalise the 2025 score (`tusrec_scores`).
  """
  if array_namespace(landmarks) is np:
    _check_landmarks(landmarks, np.shape(gt_global)[0], image_shape)
  stats = _ddf_frame_stats(pred_global, gt_global, pixel_to_image, image_shape=image_shape,
                           frames_per_chunk=frames_per_chunk)
  return _tusrec_from(stats, _landmark_errors(pred_global, gt_global, pixel_to_image, landmarks))


def tusrec_scores(errors: dict) -> dict:
  """TUS-REC 2025 normalised scores of one scan from the output of `tusrec_errors`.

  `E* = 1 - E / largest_E` (1 = perfect, 0 = identity prediction, negative = worse than identity;
  no epsilon, as in the official formula). Returns '{GPE,GLE,LPE,LLE}_score', the scan 'score'
  (mean of the four) and the leaderboard's 'global_score', 'local_score', 'pixel_score' and
  'landmark_score'. The challenge's final score is the mean of 'score' over scans.
  """
  s = {f'{key}_score': 1 - errors[key] / errors[f'largest_{key}'] for key in _TUSREC_ERRORS}
  s['score'] = (s['GPE_score'] + s['GLE_score'] + s['LPE_score'] + s['LLE_score']) / 4
  s['global_score'] = (s['GPE_score'] + s['GLE_score']) / 2
  s['local_score'] = (s['LPE_score'] + s['LLE_score']) / 2
  s['pixel_score'] = (s['GPE_score'] + s['LPE_score']) / 2
  s['landmark_score'] = (s['GLE_score'] + s['LLE_score']) / 2
  return s


def _hausdorff(a, b, rows_per_chunk: int = 256):
  """Symmetric Hausdorff distance of point sets (N,3) and (M,3); distances in row chunks."""
  a_to_b, b_to_a = 0.0, np.full(len(b), np.inf)
  for s in range(0, len(a), rows_per_chunk):
    d = np.sqrt(((a[s:s + rows_per_chunk, None, :] - b[None, :, :]) ** 2).sum(-1))
    a_to_b = max(a_to_b, d.min(1).max())
    b_to_a = np.minimum(b_to_a, d.min(0))
  return max(a_to_b, b_to_a.max())


def _drift_metrics(pred_global, gt_global):
  # Image-centre positions are the translations of the globals (origin of the centred frame).
  drift = np.linalg.norm(pred_global[:, :3, 3] - gt_global[:, :3, 3], axis=-1)
  with np.errstate(divide='ignore', invalid='ignore'):
    rate = drift / np.linalg.norm(gt_global[:, :3, 3], axis=-1) * 100  # nan at frame 0 (0/0)
  return {
      'final_drift_rate': rate[-1],
      'avg_drift_rate': rate[~np.isnan(rate)].mean(),
      'max_drift': drift.max(),
      'sum_of_drift': drift.sum(),
      'hausdorff': _hausdorff(gt_global[:, :3, 3], pred_global[:, :3, 3]),
  }


def _checked_transforms(x, name, num_frames=None):
  x = np.asarray(x, dtype=np.float64)
  where = f'dualtrack_jax.metrics.sweep_metrics: {name}'
  if x.ndim != 3 or x.shape[1:] != (4, 4) or x.shape[0] < 2:
    raise ValueError(f'{where} must be (N,4,4) with N >= 2, got shape {x.shape}')
  if num_frames is not None and x.shape[0] != num_frames:
    raise ValueError(f'{where} has {x.shape[0]} frames, pred_global has {num_frames}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{where} contains NaN or inf')
  if not np.allclose(x[0], np.eye(4), atol=1e-3):
    raise ValueError(f'{where}[0] must be the identity (global transforms), got\n{x[0]}')
  return x


def sweep_metrics(pred_global, gt_global, pixel_to_image, image_shape, *,
                  all_pixels: bool = False, landmarks=None) -> dict[str, float]:
  """All metrics of one sweep, host side (NumPy float64), with the original evaluator's keys.

  Args:
    pred_global: (N,4,4) predicted global transforms (`G_0 = I`), N >= 2, in DualTrack's centred
      image frame.
    gt_global: (N,4,4) true global transforms.
    pixel_to_image: (4,4) the sweep's 0-based pixel -> image mm matrix.
    image_shape: (H, W) of the original frames.
    all_pixels: also compute the 'ddf/all-pts-*' family (DualTrack's --include_full_ddf_metrics).
    landmarks: optional (L,3) TUS-REC landmarks (f, x, y) (see `tusrec_errors`); adds 'tusrec/*':
      GPE, GLE, LPE, LLE, largest_* and the 2025 scores of `tusrec_scores`.

  Returns:
    Python floats: 'mae/{x,y,z,pitch,roll,yaw}' (mean over all frames of the absolute difference
    of the globals' pose vectors), 'drift/{final_drift_rate,avg_drift_rate,max_drift,sum_of_drift,
    hausdorff}', 'ddf/5pt-{avg_global_displacement_error, max_global_dislacement_error (sic),
    avg_local_displacement_error, max_local_displacement_error, relative_global_err_pct}' and, if
    asked for, the same with 'ddf/all-pts-' and the 'tusrec/*' keys.
  """
  pred_global = _checked_transforms(pred_global, 'pred_global')
  gt_global = _checked_transforms(gt_global, 'gt_global', pred_global.shape[0])
  pixel_to_image = np.asarray(pixel_to_image, dtype=np.float64)
  if pixel_to_image.shape != (4, 4) or not np.all(np.isfinite(pixel_to_image)):
    raise ValueError('dualtrack_jax.metrics.sweep_metrics: pixel_to_image must be a finite '
                     f'(4,4) matrix, got shape {pixel_to_image.shape}')
  if len(image_shape) != 2 or min(image_shape) < 1:
    raise ValueError(
        f'dualtrack_jax.metrics.sweep_metrics: image_shape must be (H, W), got {image_shape}')
  height, width = (int(s) for s in image_shape)
  if landmarks is not None:
    _check_landmarks(landmarks, pred_global.shape[0], (height, width))

  metrics = {}
  mae = np.abs(matrix_to_pose_vector(pred_global) - matrix_to_pose_vector(gt_global)).mean(0)
  metrics.update({f'mae/{name}': value for name, value in zip(_MAE_NAMES, mae)})
  metrics.update({f'drift/{k}': v for k, v in _drift_metrics(pred_global, gt_global).items()})
  five = _ddf_frame_stats(pred_global, gt_global, pixel_to_image,
                          points=five_points(width, height))
  metrics.update({f'ddf/5pt-{k}': v for k, v in _ddf_summary(five).items()})
  if all_pixels or landmarks is not None:
    # One all-pixel pass serves both the 'ddf/all-pts-*' family and GPE/LPE.
    dense = _ddf_frame_stats(pred_global, gt_global, pixel_to_image, image_shape=(height, width))
    if all_pixels:
      metrics.update({f'ddf/all-pts-{k}': v for k, v in _ddf_summary(dense).items()})
    if landmarks is not None:
      errors = _tusrec_from(
          dense, _landmark_errors(pred_global, gt_global, pixel_to_image, landmarks))
      with np.errstate(divide='ignore', invalid='ignore'):
        errors.update(tusrec_scores(errors))
      metrics.update({f'tusrec/{k}': v for k, v in errors.items()})
  return {k: float(v) for k, v in metrics.items()}
