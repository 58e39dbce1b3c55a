r"""A TUS-REC challenge submission from any DualTrack-family run: the four DDFs of every scan.

Usage (through `launch.predict`, which restores the run; `interface.py` routes these flags here):
  python -m launch.predict --checkpoint=RUN --tusrec_frames_dir=DATA/frames --out=DIR
      [--tusrec_landmarks_dir=DATA/landmarks] [--tusrec_transfs_dir=DATA/transfs]
      [--tusrec_calibration=FILE] [--frames_per_chunk=8]
The submission is written into a temporary folder and published as DIR/tusrec_submission when
every scan is done.

Input: the organisers' data folder (docs/tusrec.md): `frames/<SSS>/<scan>.h5` (`frames`),
`landmarks/landmark_<SSS>.h5` (or `landmark/`, one dataset per scan), `calib_matrix.csv` and
`dataset_keys.h5` (the scans, in the organisers' order); landmarks, calibration and keys are found
beside the frames folder unless named. Without `dataset_keys.h5` every `frames/<SSS>/<scan>.h5` is a
scan. With `transfs/` (the validation layout) the official errors are computed too, as the
organisers' `test.py` does.

Output, per scan (the return value of the organisers' `predict_ddfs(frames, landmark,
data_path_calib, device)`, `QiLi111/TUS-REC2025-Challenge_baseline:utils/predict_ddfs.py`, and what
their `test.py` scores, written as files): `DIR/sub<SSS>__<scan>.h5` holds, in this order,
  GP  (N-1, 3, H*W) float32  global DDF: frame k's pixels in frame 0 minus in frame k (mm), k >= 1
  GL  (3, L)        float32  global DDF at the landmarks
  LP  (N-1, 3, H*W) float32  local DDF: frame k's pixels in frame k-1 minus in frame k
  LL  (3, L)        float32  local DDF at the landmarks
pixels in `reference_image_points` order (row-major: pixel (x, y), 1-based, at (y-1)*W + x-1), axes
(x, y, z) of the reference frame's image mm. `read_ddfs` returns the tuple. `DIR/metrics.h5` gets
`time_elapsed` per scan (s) in scan order and `scans`, plus GPE, GLE, LPE, LLE (mm) and the 2025
`score` with tforms: the datasets of the organisers' results/metrics.h5.

Frames reach the model as `launch.predict` feeds a converted sweep: each scan is written as a
temporary sweep file with the converter's geometry (`data/tusrec.py`; our pixel (u, v) is TUS-REC's
(u+1, v+1)) and `predict_sweep(variables, reader)` reads it. Its relative poses, in the centred
image frame, give the DDFs directly: a DDF does not depend on the image origin (the corner-origin
challenge frame differs by a translation).

Time per scan: the organisers time `predict_ddfs` with `time.time()` around the call, given the
frames already in memory and returning the four arrays in memory. `time_elapsed` is the same span
here: the model's prediction (reading the frames back from the just written temporary sweep, as the
original preprocesses frames in memory) and the DDF computation, not reading the scan, writing the
temporary sweep or writing the DDF files (reported apart, as `time_write`). The first scan
includes the model's compilation, as the challenge's first call includes loading the model.

Memory: the all-pixel DDFs are computed and written `frames_per_chunk` frames at a time (float64
arithmetic on (F, 3, H) and (F, 3, W) factors, rounded once into a float32 block); nothing of size
N x H x W x 3 is ever held. The scan's frames are held once while the temporary sweep is written.
"""
from collections.abc import Sequence
import dataclasses
import os
import tempfile
import time
from typing import Any

import h5py
import numpy as np

from dualtrack_jax import metrics as metrics_lib
from dualtrack_jax import pose
from dualtrack_jax import predict
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import tusrec
from ultrasound_common import errors
from ultrasound_common import files

# The order of predict_ddfs' return value, which test.py unpacks as pred_GP, pred_GL, ...
DDF_KEYS = ('GP', 'GL', 'LP', 'LL')
DATASET_KEYS = 'dataset_keys.h5'
METRICS_H5 = 'metrics.h5'
DEFAULT_FRAMES_PER_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class Scan:
  """One scan of the organisers' layout; `key` is its dataset_keys name, sub<SSS>__<scan>."""
  key: str
  subject: str
  name: str
  frames_path: str
  landmarks_path: str
  tforms_path: str | None = None


def _beside(folder: str, names: Sequence[str]) -> str | None:
  found = [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]
  return found[0] if found else None


def find_scans(frames_dir: str, landmarks_dir: str | None = None,
               transfs_dir: str | None = None) -> list[Scan]:
  """The scans under `frames_dir`, each with its landmarks (checked to exist), in the organisers'
  order: `dataset_keys.h5` beside `frames_dir` if there is one, else subject and scan names sorted.

  landmarks_dir defaults to landmarks/ or landmark/ beside frames_dir, transfs_dir to transfs/
  (optional: no tforms, no errors).
  """
  frames_dir = os.path.abspath(frames_dir)
  if not os.path.isdir(frames_dir):
    raise errors.MissingFileError(f'{frames_dir}: no such folder (--frames_dir: the challenge '
                                  "data's frames/ folder, frames/<SSS>/<scan>.h5)")
  data_dir = os.path.dirname(frames_dir)
  landmarks_dir = landmarks_dir or _beside(data_dir, ('landmarks', 'landmark'))
  if landmarks_dir is None or not os.path.isdir(landmarks_dir):
    raise errors.MissingFileError(
        f'{landmarks_dir or os.path.join(data_dir, "landmarks")}: no such folder (the landmark '
        'files landmark_<SSS>.h5 that GL and LL need; pass --landmarks_dir)')
  transfs_dir = transfs_dir or _beside(data_dir, ('transfs',))
  keys_path = os.path.join(data_dir, DATASET_KEYS)
  if os.path.isfile(keys_path):
    with h5py.File(keys_path, 'r') as f:
      keys = list(f.keys())  # test.py iterates dataset_keys.keys() in this order.
    pairs = []
    for key in keys:
      subject, sep, name = key.partition('__')
      if not (sep and subject.startswith('sub') and name):
        raise errors.InputError(f"{keys_path}: key {key!r} is not 'sub<SSS>__<scan>'")
      pairs.append((subject[len('sub'):], name))
  else:
    pairs = [(subject, file[:-len('.h5')])
             for subject in sorted(os.listdir(frames_dir))
             if os.path.isdir(os.path.join(frames_dir, subject))
             for file in sorted(os.listdir(os.path.join(frames_dir, subject)))
             if file.endswith('.h5')]
  if not pairs:
    raise errors.MissingFileError(f'{frames_dir}: no scans (expected <SSS>/<scan>.h5 files)')
  scans = []
  for subject, name in pairs:
    frames_path = os.path.join(frames_dir, subject, f'{name}.h5')
    if not os.path.isfile(frames_path):
      raise errors.MissingFileError(f'{frames_path}: missing (scan sub{subject}__{name})')
    landmarks_path = os.path.join(os.path.abspath(landmarks_dir), f'landmark_{subject}.h5')
    if not os.path.isfile(landmarks_path):
      raise errors.MissingFileError(f'{landmarks_path}: missing (the landmarks of {frames_path})')
    try:
      with h5py.File(landmarks_path, 'r') as f:
        found = sorted(f.keys())
    except OSError as e:
      raise sweeps.SweepFileError(landmarks_path, None, f'not a readable HDF5 file: {e}') from e
    if name not in found:
      raise sweeps.SweepFileError(landmarks_path, name, f'missing: no landmarks for {frames_path} '
                                  f'(found {found})')
    tforms_path = None
    if transfs_dir is not None:
      tforms_path = os.path.join(os.path.abspath(transfs_dir), subject, f'{name}.h5')
      if not os.path.isfile(tforms_path):
        raise errors.MissingFileError(f'{tforms_path}: missing (the tforms of {frames_path})')
    scans.append(Scan(f'sub{subject}__{name}', subject, name, frames_path, landmarks_path,
                      tforms_path))
  return scans


def default_calibration(frames_dir: str) -> tuple[tusrec.Calibration, str]:
  """The `calib_matrix.csv` beside frames_dir (what predict_ddfs is given), else the built-in
  2024 calibration; with a description of which."""
  path = os.path.join(os.path.dirname(os.path.abspath(frames_dir)), tusrec.CALIB_CSV)
  if os.path.isfile(path):
    return tusrec.Calibration.from_csv(path), path
  return tusrec.Calibration.tusrec_2024(), 'the built-in TUS-REC 2024 calibration'


def check_run(run: Any) -> None:
  """Raises InputError unless the run's experiment predicts whole sweeps."""
  if not hasattr(run.experiment, 'predict_sweep'):
    raise errors.InputError(
        f'{run.checkpoint_dir}: config.experiment {run.config.experiment!r} has no predict_sweep '
        'method, so it cannot predict scans')


def displacement_fields(transforms: np.ndarray, pixel_to_image: np.ndarray,
                        image_shape: tuple[int, int]) -> np.ndarray:
  """(F, 3, H*W) float32 DDFs `(T q - q)_xyz` of (F, 4, 4) transforms at every pixel q.

  q = pixel_to_image @ (u, v, 0, 1) for 0-based pixels in row-major order (the challenge's
  `reference_image_points`: their (x, y) = (u+1, v+1)). The field is affine in (u, v), so it is the
  sum of a per-row and a per-column term, computed in float64 and rounded once to float32.
  """
  h, w = image_shape
  a = (np.asarray(transforms, np.float64) - np.eye(4)) @ np.asarray(pixel_to_image, np.float64)
  rows = a[:, :3, 3, None] + a[:, :3, 1, None] * np.arange(h)  # (F, 3, H)
  cols = a[:, :3, 0, None] * np.arange(w)  # (F, 3, W)
  out = np.empty((len(a), 3, h, w), np.float32)
  np.add(rows[..., None], cols[..., None, :], out=out, casting='same_kind')
  return out.reshape(len(a), 3, h * w)


def landmark_displacements(transforms: np.ndarray, pixel_to_image: np.ndarray,
                           landmarks: np.ndarray) -> np.ndarray:
  """(3, L) float32 DDFs at landmarks (f, x, y) (x, y 1-based) of transforms[k - 1] of frame k.

  The value of `displacement_fields(transforms)[f - 1, :, (y - 1) * W + x - 1]`, as the 2025
  `cal_global_ddfs` gathers it (the 2024 code computes the same point directly).
  """
  f, x, y = np.asarray(landmarks, np.int64).T
  q = np.asarray(pixel_to_image, np.float64) @ np.stack(
      [x - 1, y - 1, np.zeros_like(x), np.ones_like(x)]).astype(np.float64)
  a = np.asarray(transforms, np.float64)[f - 1] - np.eye(4)
  return np.einsum('lij,jl->il', a[:, :3], q).astype(np.float32)


def write_ddfs(path: str, global_transforms: np.ndarray, local_transforms: np.ndarray,
               pixel_to_image: np.ndarray, image_shape: tuple[int, int], landmarks: np.ndarray,
               *, frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK, **attrs) -> tuple[float, float]:
  """Writes GP, GL, LP, LL (module docstring) to `path`, atomically; (compute, write) seconds.

  Args:
    path: the .h5 file to write.
    global_transforms: (N-1, 4, 4) frame k -> frame 0 (row k-1), image mm of `pixel_to_image`.
    local_transforms: (N-1, 4, 4) frame k -> frame k-1 (row k-1).
    pixel_to_image: (4, 4) 0-based pixel -> image mm.
    image_shape: (H, W).
    landmarks: (L, 3) rows (f, x, y), 1 <= f <= N-1, x and y 1-based.
    frames_per_chunk: frames of an all-pixel DDF computed and written at a time.
    **attrs: file attributes.
  """
  m, (h, w) = len(global_transforms), image_shape
  compute = write = 0.0
  with files.atomic_output(path) as tmp, h5py.File(tmp, 'w', track_order=True) as f:
    for key, value in attrs.items():
      f.attrs[key] = value
    for key, transforms in zip(DDF_KEYS, (global_transforms, global_transforms,
                                          local_transforms, local_transforms)):
      start = time.perf_counter()
      if key.endswith('L'):
        ddf = landmark_displacements(transforms, pixel_to_image, landmarks)
        compute += time.perf_counter() - start
        f.create_dataset(key, data=ddf)
        continue
      dataset = f.create_dataset(key, (m, 3, h * w), np.float32, chunks=(1, 3, h * w))
      for s in range(0, m, frames_per_chunk):
        start = time.perf_counter()
        block = displacement_fields(transforms[s:s + frames_per_chunk], pixel_to_image,
                                    image_shape)
        middle = time.perf_counter()
        dataset[s:s + len(block)] = block
        compute, write = compute + middle - start, write + time.perf_counter() - middle
  return compute, write


def read_ddfs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(GP, GL, LP, LL) of a scan's file: what the organisers' `predict_ddfs` returns.

  The all-pixel DDFs of a 1,600-frame 480x640 scan are 5.9 GB each.
  """
  with h5py.File(path, 'r') as f:
    return tuple(f[key][()] for key in DDF_KEYS)


def _write_sweep(path: str, frames: np.ndarray, calibration: tusrec.Calibration,
                 landmarks: np.ndarray, tforms: np.ndarray | None) -> None:
  """The scan as the converter writes it (sweeps.write_sweep's layout), tracking only with tforms.

  Written with h5py because write_sweep insists on tracking, which the test layout lacks; the
  reader validates the file as any sweep.
  """
  (sx, sy), image_shape = calibration.spacing, frames.shape[1:]
  with h5py.File(path, 'w') as f:
    f.create_dataset(sweeps.IMAGES, data=frames, chunks=(1, *image_shape))
    f.create_dataset(sweeps.SPACING, data=np.array([sx, sy, 1.0]))
    f.create_dataset(sweeps.PIXEL_TO_IMAGE, data=tusrec.pixel_to_image((sx, sy), image_shape))
    f.create_dataset(sweeps.DIMENSIONS, data=np.array([image_shape[1], image_shape[0], 1]))
    f.create_dataset(sweeps.LANDMARKS, data=landmarks)
    if tforms is not None:
      f.create_dataset(sweeps.TRACKING,
                       data=tusrec.tusrec_to_tracking(tforms, calibration, image_shape))


def _check_landmarks(scan: Scan, landmarks: np.ndarray, num_frames: int,
                     image_shape: tuple[int, int]) -> None:
  """1 <= f <= N-1 (f - 1 indexes the (N-1)-row DDFs; 0 would wrap), 1 <= x <= W, 1 <= y <= H."""
  (h, w), f, x, y = image_shape, *landmarks.T
  for label, values, high in (('frame', f, num_frames - 1), ('x', x, w), ('y', y, h)):
    if len(values) and (values.min() < 1 or values.max() > high):
      raise sweeps.SweepFileError(
          scan.landmarks_path, scan.name, f'{label} must lie in [1, {high}] for {scan.frames_path} '
          f'({num_frames} frames of {h}x{w}), got [{values.min()}, {values.max()}]')


def predict_scan(run: Any, scan: Scan, out_path: str, calibration: tusrec.Calibration, *,
                 work_dir: str, frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK
                 ) -> dict[str, float]:
  """Writes one scan's DDF file; returns its times and, with tforms, its errors and score."""
  frames = tusrec.read_raw_frames(scan.frames_path)
  num_frames, image_shape = len(frames), frames.shape[1:]
  landmarks = tusrec.read_raw_landmarks(scan.landmarks_path, scan.name)
  _check_landmarks(scan, landmarks, num_frames, image_shape)
  tforms = (None if scan.tforms_path is None
            else tusrec.read_raw_tforms(scan.tforms_path, num_frames))
  sweep_path = os.path.join(work_dir, f'{scan.key}.h5')
  _write_sweep(sweep_path, frames, calibration, landmarks, tforms)
  del frames
  try:
    with sweeps.SweepReader(sweep_path, require_tracking=False) as reader:
      start = time.perf_counter()
      _, local, pred = predict.predict_poses(run, reader, scan.frames_path)
      predict_s = time.perf_counter() - start
      pixel_to_image, tracking = reader.pixel_to_image, reader.tracking
  finally:
    os.remove(sweep_path)
  compute_s, write_s = write_ddfs(
      out_path, pred[1:], local, pixel_to_image, image_shape, landmarks,
      frames_per_chunk=frames_per_chunk, frames=scan.frames_path,
      checkpoint=run.checkpoint_dir, step=run.step)
  result = {'time_elapsed': predict_s + compute_s, 'time_write': write_s}
  if tracking is not None:
    errors_ = metrics_lib.tusrec_errors(pred, pose.global_transforms(tracking), pixel_to_image,
                                        image_shape, landmarks)
    result.update({k: float(v) for k, v in errors_.items() if not k.startswith('largest_')})
    result['score'] = float(metrics_lib.tusrec_scores(errors_)['score'])
  return result


def write_submission(run: Any, scans: Sequence[Scan], out: str,
                     calibration: tusrec.Calibration, *,
                     frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK) -> dict[str, dict]:
  """Writes every scan's DDF file into `out`, then `out/metrics.h5`; returns {key: result}.

  `run`: anything with .experiment (with predict_sweep), .variables, .checkpoint_dir and .step
  (`launch.experiment.Run`).
  """
  check_run(run)
  if not scans:
    raise errors.InputError('no scans to predict')
  if frames_per_chunk < 1:
    raise errors.InputError(f'--frames_per_chunk must be positive, got {frames_per_chunk}')
  os.makedirs(out, exist_ok=True)
  results = {}
  with tempfile.TemporaryDirectory(prefix='.sweeps-', dir=out) as work_dir:
    for i, scan in enumerate(scans):
      path = os.path.join(out, f'{scan.key}.h5')
      results[scan.key] = r = predict_scan(run, scan, path, calibration, work_dir=work_dir,
                                           frames_per_chunk=frames_per_chunk)
      errors_ = ''.join(f', {k} {r[k]:.4f}' for k in ('GPE', 'GLE', 'LPE', 'LLE', 'score')
                        if k in r)
      print(f'[{i + 1}/{len(scans)}] {scan.key}: {r["time_elapsed"]:.2f} s (write '
            f'{r["time_write"]:.2f} s){errors_}\nWrote {path}', flush=True)
  with files.atomic_output(os.path.join(out, METRICS_H5)) as tmp, h5py.File(tmp, 'w') as f:
    f.create_dataset('scans', data=[s.key for s in scans], dtype=h5py.string_dtype())
    for key in next(iter(results.values())):
      f.create_dataset(key, data=np.array([r[key] for r in results.values()]))
  return results


def plan(run: Any, frames_dir: str, *, landmarks_dir: str | None = None,
         transfs_dir: str | None = None, calibration: str | None = None,
         frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK):
  """`launch.predict --tusrec_frames_dir=...`: one output unit, the whole submission folder.

  Every scan and the run are checked first; `write(folder, name)` writes the submission into
  `folder` (published as `OUT/tusrec_submission` when complete) and returns (a summary, {}).
  """
  check_run(run)
  scans = find_scans(frames_dir, landmarks_dir, transfs_dir)
  if calibration:
    calib, source = tusrec.Calibration.from_csv(calibration), calibration
  else:
    calib, source = default_calibration(frames_dir)
  print(f'{len(scans)} scans; calibration: {source}', flush=True)

  def write(folder: str, name: str) -> tuple[str, dict[str, float]]:
    del name  # The runtime names the folder.
    results = write_submission(run, scans, folder, calib, frames_per_chunk=frames_per_chunk)
    total = sum(r['time_elapsed'] for r in results.values())
    return (f'TUS-REC submission: {len(results)} scans of {frames_dir}, '
            f'{total:.1f} s of prediction (time_elapsed in metrics.h5)'), {}

  return [('tusrec_submission', write)]
