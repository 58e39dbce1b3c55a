"""Whole-sweep prediction from sweep files, for `launch.predict` (see `interface.py`).

For each sweep, the output folder `<sweep_id>/` gets
  poses.h5        predicted relative pose vectors, relative and global 4x4 transforms, the tracked
                  global transforms and the sweep's pixel_to_image (conventions in its attributes)
  trajectory.png  predicted vs. tracked trajectory of the image centre, three projections
  volume.nii.gz   the frames compounded at their predicted poses on a grid of `spacing_mm` in
                  frame 0's image frame, plus mask.nii.gz (1 where a pixel landed); or volume.h5
                  ('volume', 'mask', 'spacing', 'origin') with volume_format='h5'
  slices.png      three orthogonal mid-slices of the volume
  metrics.json    every metric of `dualtrack_jax.metrics.sweep_metrics` against the file's
                  tracking (DDF on 5 points and on all pixels, MAE, drift; with landmarks in the
                  file also the TUS-REC GPE/GLE/LPE/LLE and scores), also printed as a table.
A sweep without `tracking` (no ground truth: what a sensorless user has) gets everything but the
metrics; poses.h5 then has no tracked transforms and the plot shows the prediction alone. The
model's own part is its experiment's `predict_sweep(variables, reader)`: (N-1, 6) relative pose
vectors in the file's image frame.
"""
import json
import os
from typing import Any

import h5py
import ml_collections
import numpy as np

from dualtrack_jax import metrics as metrics_lib
from dualtrack_jax import plots
from dualtrack_jax import pose
from dualtrack_jax import volume as volume_lib
from dualtrack_jax.data import datasets
from dualtrack_jax.data import sweeps
from ultrasound_common import errors

VOLUME_FORMATS = ('nii.gz', 'nii', 'h5')
# The metric shown in the trajectory plot's title ("GPE" of the paper's tables).
_TITLE_METRIC = 'ddf/5pt-avg_global_displacement_error'
_POSE_VECTOR = ('[tx, ty, tz] in mm, [rx, ry, rz] in degrees, R = Rz(rz) Ry(ry) Rx(rx) (SciPy '
                'extrinsic "xyz")')
_IMAGE_FRAME = ('image coordinates in mm centred on the image (pixel_to_image maps a 0-based pixel '
                '(column, row, 0, 1) to them): x lateral, y axial (down), z = x cross y')


def sweep_inputs(config: ml_collections.ConfigDict, sweep_paths=(), dataset: str | None = None,
                 split: str = 'val', registry: str | None = None) -> list[tuple[str, str]]:
  """(sweep_id, path) of the sweeps to predict; every file is validated before any prediction."""
  if bool(sweep_paths) == bool(dataset):
    raise errors.InputError(
        'give sweep files (--sweep=FILE.h5, repeatable) or --dataset=NAME, not both '
        'and not neither')
  if dataset:
    data = ml_collections.ConfigDict(dict(config.get('data', {})))
    data.dataset = dataset
    if registry:
      data.registry = registry
    inputs = [(r.sweep_id, r.path) for r in datasets.load_split(data, split)]
    if not inputs:
      raise errors.InputError(f"--dataset={dataset}: no sweeps in split '{split}'")
  else:
    inputs = [(os.path.splitext(os.path.basename(p))[0], os.fspath(p)) for p in sweep_paths]
  for _, path in inputs:
    sweeps.validate_sweep(path, require_tracking=False)
  return inputs


def _write_poses(path: str, vectors, relative, pred_global, gt_global, pixel_to_image,
                 **attrs) -> None:
  with h5py.File(path, 'w') as f:
    f.attrs['image_frame'] = _IMAGE_FRAME
    for key, value in attrs.items():
      f.attrs[key] = value
    items = (
        ('relative_pose_vectors', vectors,
         f'row k: the motion from frame k+1 to frame k as a pose vector, {_POSE_VECTOR}'),
        ('relative_transforms', relative,
         '[k] maps frame-(k+1) image coordinates to frame-k image coordinates (mm)'),
        ('global_transforms', pred_global,
         '[i] maps frame-i image coordinates to frame-0 image coordinates (mm); [0] = I'),
        ('tracking_global_transforms', gt_global,
         "the file's tracking as global transforms, T_0^-1 T_i (mm), for comparison"),
        ('pixel_to_image', pixel_to_image, "the sweep file's pixel -> image mm matrix"))
    for key, value, meaning in items:
      if value is None:  # No tracking in the sweep file.
        continue
      f.create_dataset(key, data=np.asarray(value, np.float64))
      f[key].attrs['meaning'] = meaning


def predict_poses(run: Any, reader: sweeps.SweepReader, source: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The run's (N-1, 6) relative pose vectors of a sweep, checked (shape, finite), with their
  (N-1, 4, 4) relative and (N, 4, 4) global transforms; errors name `source`."""
  n = reader.num_frames
  vectors = np.asarray(run.experiment.predict_sweep(run.variables, reader), np.float64)
  if vectors.shape != (n - 1, 6) or not np.all(np.isfinite(vectors)):
    raise errors.InputError(
        f'{source}: the model predicted pose vectors of shape {vectors.shape}'
        f'{"" if np.all(np.isfinite(vectors)) else " with NaN or inf"}; expected '
        f'({n - 1}, 6) finite values for {n} frames')
  relative = pose.pose_vector_to_matrix(vectors)
  return vectors, relative, pose.compose_relative(relative)


def write_outputs(run: Any, sweep_id: str, reader: sweeps.SweepReader, out: str, *,
                  spacing_mm: float, volume_format: str, compounding: str,
                  max_voxels: int) -> dict[str, float]:
  """Writes every output of one sweep into the folder `out` (module docstring); returns its
  metrics ({} without tracking)."""
  image_hw, pixel_to_image = reader.image_shape, reader.pixel_to_image
  vectors, relative, pred = predict_poses(run, reader, reader.path)
  tracking = reader.tracking
  if tracking is None:
    gt, metrics = None, {}
  else:
    gt = pose.global_transforms(tracking)
    metrics = metrics_lib.sweep_metrics(pred, gt, pixel_to_image, image_hw, all_pixels=True,
                                        landmarks=reader.landmarks)
  _write_poses(os.path.join(out, 'poses.h5'), vectors, relative, pred, gt, pixel_to_image,
               sweep=reader.path, checkpoint=run.checkpoint_dir, step=run.step)
  title = (f'{sweep_id}: GPE (5 points) {metrics[_TITLE_METRIC]:.2f} mm' if metrics
           else f'{sweep_id} (no tracking in the file)')
  plots.trajectory_figure(
      pred, gt, title=title, pixel_to_image=pixel_to_image, image_shape=image_hw).savefig(
          os.path.join(out, 'trajectory.png'))

  with h5py.File(reader.path, 'r') as f:
    volume = volume_lib.reconstruct(f[sweeps.IMAGES], pred, pixel_to_image, spacing_mm,
                                    method=compounding, max_voxels=max_voxels)
  where = f'{sweep_id}, frames at predicted poses, {compounding} compounding'
  if volume_format == 'h5':
    volume_lib.write_h5(os.path.join(out, 'volume.h5'), volume, description=where)
  else:
    volume_lib.write_nifti(os.path.join(out, f'volume.{volume_format}'), volume.data,
                           volume.grid, description=where)
    volume_lib.write_nifti(os.path.join(out, f'mask.{volume_format}'),
                           volume.mask.astype(np.uint8), volume.grid, description='coverage')
  volume_lib.slices_figure(volume, title=where).savefig(os.path.join(out, 'slices.png'))

  if metrics:
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
      json.dump({'sweep_id': sweep_id, 'sweep': reader.path,
                 'checkpoint': run.checkpoint_dir, 'step': run.step,
                 'metrics': metrics}, f, indent=2, sort_keys=True)
  return metrics


def plan(run: Any, *, sweep_paths=(), dataset: str | None = None, split: str = 'val',
         registry: str | None = None, spacing_mm: float = 0.5, volume_format: str = 'nii.gz',
         compounding: str = 'pnn', max_voxels: int = volume_lib.DEFAULT_MAX_VOXELS):
  """One (sweep_id, write) per sweep, after every file and option has been checked.

  `write(folder, name)` writes the sweep's outputs (module docstring) into `folder` and returns
  (the text to print, the sweep's metrics: {} without tracking).
  """
  if not hasattr(run.experiment, 'predict_sweep'):
    raise errors.InputError(
        f"{run.checkpoint_dir}: config.experiment '{run.config.experiment}' has no "
        'predict_sweep method, so it cannot predict sweeps')
  if volume_format not in VOLUME_FORMATS:
    raise errors.InputError(
        f'--volume_format must be one of {VOLUME_FORMATS}, got {volume_format!r}')
  if compounding not in volume_lib.METHODS:
    raise errors.InputError(
        f'--compounding must be one of {volume_lib.METHODS}, got {compounding!r}')
  if not spacing_mm > 0:
    raise errors.InputError(f'--spacing_mm must be positive, got {spacing_mm}')

  def writer(sweep_id: str, path: str):
    def write(folder: str, name: str) -> tuple[str, dict[str, float]]:
      del name  # The runtime names the folder.
      with sweeps.SweepReader(path, require_tracking=False) as reader:
        metrics = write_outputs(run, sweep_id, reader, folder, spacing_mm=spacing_mm,
                                volume_format=volume_format, compounding=compounding,
                                max_voxels=max_voxels)
      note = '' if metrics else '\nno tracking in the file: no metrics'
      return f'{sweep_id} ({path}){note}', metrics
    return write

  return [(sweep_id, writer(sweep_id, path)) for sweep_id, path in
          sweep_inputs(run.config, sweep_paths, dataset, split, registry)]
