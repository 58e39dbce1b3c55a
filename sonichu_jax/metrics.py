"""Keypoint and biometry metrics of the FM_UIA challenge and the SONICHU card (NumPy, float64).

Errors are in original-image pixels (as FM_UIA's `evaluate.py`: no pixel spacing, no
normalisation), from keypoints (..., K, 2) as (x, y).

- Per sample: MRE_s = mean over the K keypoints of the Euclidean distance (FM_UIA `evaluate.py`).
- Per task: MRE_t = mean of MRE_s over the task's samples.
- `mre/unweighted` = mean of MRE_t over the tasks that have samples: the leaderboard's "Average
  MRE" and the card's "unweighted per-task mean" (its nine per-task numbers average to its 18.07).
- `mre/weighted` = mean of MRE_s over all samples pooled, i.e. sum_t n_t MRE_t / sum_t n_t: the
  card's "weighted MRE" (7.30 px, dominated by AOP, 60.7 % of its validation samples).

FM_UIA scores a missing ground-truth point as the point (0, 0) (its loader and evaluator fill
empty cells with [0, 0]); `visible=None` reproduces that. With a `visible` mask, MRE_s averages the
visible keypoints only, and samples with none are left out of every mean.

Success detection rates (SDR) are the fraction of keypoints with radial error <= r, pooled over
keypoints; FM_UIA images carry no pixel spacing, so radii are in pixels (SDR_RADII_PX), not in mm
as in cephalometry's 2 to 4 mm.

Biometry (docs/sonichu.md, section "Metrics"), from the measurement kind of `sonichu_jax.tasks`:

| kind           | tasks              | measurements                                          |
|----------------|--------------------|-------------------------------------------------------|
| `length`       | FUGC, IVC, femur   | distance between keypoints 0 and 1 (CL, IVC, FL)      |
| `ellipse`      | HC, FA             | diameters d01, d23 and the ellipse perimeter (HC, AC) |
| `angle`        | AOP                | angle of progression in degrees                       |
| `pair_lengths` | PLAX, PSAX, A4C    | distances of the pairs (0, 1), (2, 3), ...            |

The ellipse perimeter is Ramanujan's second approximation with semi-axes a = d01 / 2 and
b = d23 / 2 (it uses the two diameters' lengths only, i.e. assumes they are the ellipse's axes).
Its relative error is below 1e-6 for b / a >= 0.3, far under any annotation error.
"""
from collections.abc import Mapping

import numpy as np

from sonichu_jax import tasks

SDR_RADII_PX = (5.0, 10.0, 20.0)

# AOP keypoint roles, our assumption: the card does not publish them (docs/sonichu.md, section
# "Tasks and keypoints"). Ours, which the synthetic generator follows: 0 = cranial end of the
# pubic symphysis, 1 = its inferior end (the vertex), 2 = the point where the line from the
# inferior end touches the fetal skull, 3 = the skull's point nearest to the inferior end.
# AoP = angle at keypoint 1 between the rays to 0 and to 2.
AOP_ANGLE_KEYPOINTS = (0, 1, 2)

# Names of the measurements, in the order of the keypoint pairs. The cardiac names follow a
# third-party FM_UIA scoring module (unverified; docs/sonichu.md, section "Tasks and keypoints");
# A4C: per chamber its up-down, then its left-right dimension.
MEASUREMENT_NAMES: dict[str, tuple[str, ...]] = {
    'AOP': ('AoP',),
    'FUGC': ('CL',),
    'FA': ('TAD', 'APAD', 'AC'),
    'HC': ('OFD', 'BPD', 'HC'),
    'IVC': ('IVC',),
    'PLAX': ('LV', 'RV', 'IVS', 'LVPW', 'VAO', 'STJ', 'AAO', 'AV', 'LVOT', 'LA', 'RVOT'),
    'PSAX': ('RVOT', 'PA'),
    'A4C': tuple(f'{c}_{d}' for c in ('LV', 'RV', 'LA', 'RA') for d in ('ud', 'lr')),
    'fetal_femur': ('FL',),
}


def _as_points(points, name: str, num_keypoints: int | None = None) -> np.ndarray:
  points = np.asarray(points, np.float64)
  if points.ndim < 2 or points.shape[-1] != 2:
    raise ValueError(f'{name} must have shape (..., K, 2), got {points.shape}')
  if num_keypoints is not None and points.shape[-2] != num_keypoints:
    raise ValueError(f'{name} has {points.shape[-2]} keypoints, the task has {num_keypoints}')
  return points


def radial_errors(pred, target) -> np.ndarray:
  """Euclidean distances (..., K) between predicted and target keypoints (..., K, 2)."""
  pred, target = _as_points(pred, 'pred'), _as_points(target, 'target')
  if pred.shape != target.shape:
    raise ValueError(f'pred {pred.shape} and target {target.shape} differ in shape')
  return np.sqrt(np.sum((pred - target) ** 2, axis=-1))


def sample_mre(pred, target, visible=None) -> np.ndarray:
  """MRE of each sample (...,): mean radial error over its (visible) keypoints; NaN if none is."""
  errors = radial_errors(pred, target)
  if visible is None:
    return errors.mean(axis=-1)
  visible = np.broadcast_to(np.asarray(visible, bool), errors.shape)
  count = visible.sum(axis=-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(visible, errors, 0.0).sum(axis=-1) / np.where(count > 0, count, np.nan)


def success_rates(errors, radii=SDR_RADII_PX) -> dict[float, float]:
  """Fraction of the (finite) radial errors <= each radius; NaN errors (invisible) are skipped."""
  errors = np.asarray(errors, np.float64).ravel()
  errors = errors[np.isfinite(errors)]
  if not errors.size:
    raise ValueError('success_rates: no finite radial errors')
  return {float(r): float(np.mean(errors <= r)) for r in radii}


def mre_summary(per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
  """The card's MRE table from per-sample MREs grouped by task (NaN samples are left out).

  Args:
    per_sample: task name -> (n_t,) per-sample MREs (`sample_mre`) in original pixels.

  Returns:
    {'mre/<task>': MRE_t, 'count/<task>': n_t} for every task with samples, plus 'mre/weighted'
    (mean over all samples pooled), 'mre/unweighted' (mean over tasks) and 'count/total'.
  """
  out, pooled, task_means = {}, [], []
  for name, values in per_sample.items():
    tasks.get_task(name)
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
      continue
    task_means.append(values.mean())
    out[f'mre/{name}'] = float(task_means[-1])
    out[f'count/{name}'] = float(values.size)
    pooled.append(values)
  if not pooled:
    raise ValueError('mre_summary: no task has a sample with a finite MRE')
  out['mre/weighted'] = float(np.concatenate(pooled).mean())
  out['mre/unweighted'] = float(np.mean(task_means))
  out['count/total'] = float(sum(v.size for v in pooled))
  return out


def ramanujan_perimeter(a, b) -> np.ndarray:
  """Perimeter of the ellipse with semi-axes a, b: Ramanujan's second approximation.

  pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))), h = ((a - b) / (a + b))^2; exact for a circle.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  total = a + b
  with np.errstate(invalid='ignore', divide='ignore'):
    h = np.where(total > 0, ((a - b) / total) ** 2, 0.0)
  return np.pi * total * (1.0 + 3.0 * h / (10.0 + np.sqrt(4.0 - 3.0 * h)))


def angle_degrees(arm_a, vertex, arm_b) -> np.ndarray:
  """Angle at `vertex` between the rays to `arm_a` and `arm_b` (..., 2), in degrees in [0, 180]."""
  u = np.asarray(arm_a, np.float64) - vertex
  v = np.asarray(arm_b, np.float64) - vertex
  # atan2 of cross and dot: accurate near 0 and 180 degrees, where arccos of the cosine is not.
  cross = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
  return np.degrees(np.arctan2(np.abs(cross), np.sum(u * v, axis=-1)))


def _pair_lengths(points: np.ndarray) -> np.ndarray:
  """Distances (..., K // 2) of the consecutive keypoint pairs (0, 1), (2, 3), ..."""
  return np.linalg.norm(points[..., 0::2, :] - points[..., 1::2, :], axis=-1)


def measure(task: str, keypoints) -> dict[str, np.ndarray]:
  """The task's clinical measurements (MEASUREMENT_NAMES) from keypoints (..., K, 2).

  Lengths are in the keypoints' unit (original pixels; multiply by mm/pixel where known), AoP in
  degrees. Each value has the keypoints' leading shape.
  """
  spec = tasks.get_task(task)
  points = _as_points(keypoints, f'{task} keypoints', spec.num_keypoints)
  names = MEASUREMENT_NAMES[task]
  if spec.measurement == 'angle':
    s, i, t = (points[..., k, :] for k in AOP_ANGLE_KEYPOINTS)
    values = [angle_degrees(s, i, t)]
  elif spec.measurement == 'ellipse':
    d01, d23 = np.moveaxis(_pair_lengths(points), -1, 0)
    values = [d01, d23, ramanujan_perimeter(d01 / 2, d23 / 2)]
  else:  # 'length' (one pair) and 'pair_lengths'
    values = list(np.moveaxis(_pair_lengths(points), -1, 0))
  return dict(zip(names, values, strict=True))


def measurement_errors(task: str, pred, target) -> dict[str, np.ndarray]:
  """Signed errors pred - target of each measurement of `task` (..., per sample)."""
  pred_values, target_values = measure(task, pred), measure(task, target)
  return {name: pred_values[name] - target_values[name] for name in pred_values}


def evaluate(pred: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
             visible: Mapping[str, np.ndarray] | None = None,
             radii=SDR_RADII_PX) -> dict[str, float]:
  """Every metric of a validation set, keypoints in original pixels grouped by task.

  Args:
    pred, target: task name -> (n_t, K_t, 2) predicted and ground-truth keypoints (x, y) in
      original-image pixels.
    visible: optional task name -> (n_t, K_t) ground-truth validity; None scores every keypoint, as
      FM_UIA does (a missing point is (0, 0) there).
    radii: success-rate radii in pixels.

  Returns:
    `mre_summary`'s keys; 'sdr@<r>px/<task>' and 'sdr@<r>px/all' (keypoints pooled); and per
    measurement m of a task, over the samples whose keypoints are all visible:
    'biometry/<task>/<m>_mae' (mean absolute error, pixels or degrees) and
    'biometry/<task>/<m>_mape' (mean absolute error relative to the target, in %).
  """
  if set(pred) != set(target):
    raise ValueError(f'pred tasks {sorted(pred)} differ from target tasks {sorted(target)}')
  per_sample, errors_by_task, out = {}, {}, {}
  for name in pred:
    spec = tasks.get_task(name)
    p = _as_points(pred[name], f'pred[{name!r}]', spec.num_keypoints)
    t = _as_points(target[name], f'target[{name!r}]', spec.num_keypoints)
    v = None if visible is None else np.asarray(visible[name], bool)
    errors = radial_errors(p, t)
    per_sample[name] = sample_mre(p, t, v)
    errors_by_task[name] = errors if v is None else np.where(v, errors, np.nan)
    complete = np.ones(errors.shape[:-1], bool) if v is None else v.all(axis=-1)
    if complete.any():
      target_values = measure(name, t[complete])
      for m, err in measurement_errors(name, p[complete], t[complete]).items():
        out[f'biometry/{name}/{m}_mae'] = float(np.mean(np.abs(err)))
        with np.errstate(divide='ignore', invalid='ignore'):
          out[f'biometry/{name}/{m}_mape'] = float(
              100.0 * np.mean(np.abs(err) / np.abs(target_values[m])))
  out.update(mre_summary(per_sample))
  for name, errors in errors_by_task.items():
    if np.isfinite(errors).any():
      for r, rate in success_rates(errors, radii).items():
        out[f'sdr@{r:g}px/{name}'] = rate
  pooled = np.concatenate([e.ravel() for e in errors_by_task.values()])
  for r, rate in success_rates(pooled, radii).items():
    out[f'sdr@{r:g}px/all'] = rate
  return out
