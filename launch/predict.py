r"""Predicts on real files: `python -m launch.predict --checkpoint=DIR --sweep=sweep.h5 [...]`.

Sweep models (DualTrack; `dualtrack_jax` experiments): for each sweep, `OUT/<sweep_id>/` gets
  poses.h5        predicted relative pose vectors, relative and global 4x4 transforms, the tracked
                  global transforms and the sweep's pixel_to_image (conventions in its attributes)
  trajectory.png  predicted vs. tracked trajectory of the image centre, three projections
  volume.nii.gz   the frames compounded at their predicted poses on a grid of --spacing_mm in
                  frame 0's image frame, plus mask.nii.gz (1 where a pixel landed); or volume.h5
                  ('volume', 'mask', 'spacing', 'origin') with --volume_format=h5
  slices.png      three orthogonal mid-slices of the volume
  metrics.json    every metric of `dualtrack_jax.metrics.sweep_metrics` against the file's
                  tracking (DDF on 5 points and on all pixels, MAE, drift; with landmarks in the
                  file also the TUS-REC GPE/GLE/LPE/LLE and scores), also printed as a table.
A sweep without `tracking` (no ground truth: what a sensorless user has) gets everything but the
metrics; poses.h5 then has no tracked transforms and the plot shows the prediction alone.
Each folder is written under a temporary name and renamed when complete (replacing an earlier
result), so a crash never leaves a result that looks complete.

  python -m launch.predict --checkpoint=workdirs/local_stage1_sim --sweep=a.h5 --sweep=b.h5
  python -m launch.predict --checkpoint=workdirs/local_stage1_sim --dataset=tus-rec --split=val

--checkpoint: a run folder (its best checkpoint, else its latest) or a step folder
  (`.../checkpoints/1200`, `.../best/900`).
--dataset: a registered dataset name, a sweep CSV, or 'synthetic' (the checkpoint config's
  simulated dataset); with --split (default val) and optionally --registry.
--out: default `<run folder>/predict/<checkpoints|best>_<step>`.

Keypoint models (SONICHU; `sonichu_jax` experiments): `IMAGE [IMAGE ...] --task=TASK` prints
each image's keypoints in its own pixels and the task's measurements (pixels, or degrees for the
angle of progression), and writes into OUT
  <image>_<task>.png   the image with the keypoints (numbered) and the measured segments
  <image>_<task>.json  keypoints (pixels and normalised), measurements, image size, checkpoint

  python -m launch.predict scan.png --task=fetal_femur --checkpoint=workdirs/sonichu_sim

Model families are told apart by the package of the checkpoint config's `experiment`
(`_FAMILIES`).
"""
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any
import uuid

from absl import app
from absl import flags
import h5py
import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np
from PIL import Image

from dualtrack_jax import metrics as metrics_lib
from dualtrack_jax import pose
from dualtrack_jax import volume as volume_lib
from dualtrack_jax.data import datasets
from dualtrack_jax.data import sweeps
from launch import checkpointing
from launch import config_utils
from launch import evaluate
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import plots
from sonichu_jax import metrics as keypoint_metrics
from sonichu_jax import tasks as keypoint_tasks

VOLUME_FORMATS = ('nii.gz', 'nii', 'h5')
# The metric shown in the trajectory plot's title ("GPE" of the paper's tables).
_TITLE_METRIC = 'ddf/5pt-avg_global_displacement_error'
_POSE_VECTOR = ('[tx, ty, tz] in mm, [rx, ry, rz] in degrees, R = Rz(rz) Ry(ry) Rx(rx) (SciPy '
                'extrinsic "xyz")')
_IMAGE_FRAME = ('image coordinates in mm centred on the image (pixel_to_image maps a 0-based pixel '
                '(column, row, 0, 1) to them): x lateral, y axial (down), z = x cross y')


@dataclasses.dataclass
class Restored:
  """A checkpoint ready to predict: its experiment (model only), variables and config."""
  experiment: Any
  variables: Any
  config: ml_collections.ConfigDict
  checkpoint_dir: str  # The step folder, e.g. '<run>/best/900'.
  step: int

  @property
  def run_dir(self) -> str:
    return os.path.dirname(os.path.dirname(self.checkpoint_dir))


def restore(checkpoint: str) -> Restored:
  """Restores a run folder's best (else latest) checkpoint or a step folder, on one device."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f'--checkpoint={checkpoint}: no such folder')
  step_dir = os.path.basename(os.path.normpath(checkpoint)).isdigit()
  directory, step = checkpointing.find_checkpoint(None if step_dir else checkpoint,
                                                  checkpoint if step_dir else 'best')
  # Whole-sweep prediction is batch 1: one device, whatever the layout the run was saved with.
  variables, config_json = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  config = config_utils.from_json_dict(config_json)
  experiment = experiment_lib.load_experiment(config, load_data=False)
  return Restored(experiment=experiment, variables=variables, config=config,
                  checkpoint_dir=os.path.join(directory, str(step)), step=step)


def sweep_inputs(restored: Restored, sweep_paths=(), dataset: str | None = None,
                 split: str = 'val', registry: str | None = None) -> list[tuple[str, str]]:
  """(sweep_id, path) of the sweeps to predict; every file is validated before any prediction."""
  if bool(sweep_paths) == bool(dataset):
    raise ValueError('give sweep files (--sweep=FILE.h5, repeatable) or --dataset=NAME, not both '
                     'and not neither')
  if dataset:
    data = ml_collections.ConfigDict(dict(restored.config.get('data', {})))
    data.dataset = dataset
    if registry:
      data.registry = registry
    inputs = [(r.sweep_id, r.path) for r in datasets.load_split(data, split)]
    if not inputs:
      raise ValueError(f"--dataset={dataset}: no sweeps in split '{split}'")
  else:
    inputs = [(os.path.splitext(os.path.basename(p))[0], os.fspath(p)) for p in sweep_paths]
  folders = {}
  for sweep_id, path in inputs:
    sweeps.validate_sweep(path, require_tracking=False)
    folder = plots.safe_filename(sweep_id)
    if folder in folders:
      raise ValueError(f'{path} and {folders[folder]} would both write to the folder {folder!r}; '
                       'rename one of them')
    folders[folder] = path
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


def _sweep_outputs(restored: Restored, sweep_id: str, reader: sweeps.SweepReader, out: str, *,
                   spacing_mm: float, volume_format: str, compounding: str,
                   max_voxels: int) -> dict[str, float]:
  """Writes every output of one sweep into the folder `out`; returns its metrics."""
  n, image_hw, pixel_to_image = reader.num_frames, reader.image_shape, reader.pixel_to_image
  vectors = np.asarray(restored.experiment.predict_sweep(restored.variables, reader), np.float64)
  if vectors.shape != (n - 1, 6) or not np.all(np.isfinite(vectors)):
    raise ValueError(f'{reader.path}: the model predicted pose vectors of shape {vectors.shape}'
                     f'{"" if np.all(np.isfinite(vectors)) else " with NaN or inf"}; expected '
                     f'({n - 1}, 6) finite values for {n} frames')
  relative = pose.pose_vector_to_matrix(vectors)
  pred = pose.compose_relative(relative)
  tracking = reader.tracking
  if tracking is None:
    gt, metrics = None, {}
  else:
    gt = pose.global_transforms(tracking)
    metrics = metrics_lib.sweep_metrics(pred, gt, pixel_to_image, image_hw, all_pixels=True,
                                        landmarks=reader.landmarks)
  _write_poses(os.path.join(out, 'poses.h5'), vectors, relative, pred, gt, pixel_to_image,
               sweep=reader.path, checkpoint=restored.checkpoint_dir, step=restored.step)
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
                 'checkpoint': restored.checkpoint_dir, 'step': restored.step,
                 'metrics': metrics}, f, indent=2, sort_keys=True)
  return metrics


def _replace_dir(src: str, dst: str) -> None:
  """Renames the finished folder `src` onto `dst`, moving an earlier `dst` aside first."""
  old = None
  if os.path.exists(dst):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=os.path.dirname(dst))
    os.rename(dst, os.path.join(old, 'result'))
  os.rename(src, dst)
  if old is not None:
    shutil.rmtree(old)


def predict_sweeps(restored: Restored, *, sweep_paths=(), dataset: str | None = None,
                   split: str = 'val', registry: str | None = None, out: str | None = None,
                   spacing_mm: float = 0.5, volume_format: str = 'nii.gz',
                   compounding: str = 'pnn',
                   max_voxels: int = volume_lib.DEFAULT_MAX_VOXELS) -> dict[str, dict]:
  """Predicts every sweep and writes its outputs (module docstring); returns {sweep_id: metrics}."""
  if not hasattr(restored.experiment, 'predict_sweep'):
    raise config_utils.ConfigError(
        f"{restored.checkpoint_dir}: config.experiment '{restored.config.experiment}' has no "
        'predict_sweep method, so it cannot predict sweeps')
  if volume_format not in VOLUME_FORMATS:
    raise ValueError(f'--volume_format must be one of {VOLUME_FORMATS}, got {volume_format!r}')
  if not spacing_mm > 0:
    raise ValueError(f'--spacing_mm must be positive, got {spacing_mm}')
  inputs = sweep_inputs(restored, sweep_paths, dataset, split, registry)
  out = out or os.path.join(restored.run_dir, 'predict', '_'.join(
      restored.checkpoint_dir.split(os.sep)[-2:]))
  os.makedirs(out, exist_ok=True)
  results = {}
  for sweep_id, path in inputs:
    final = os.path.join(out, plots.safe_filename(sweep_id))
    # os.mkdir, not tempfile.mkdtemp: the result keeps the umask's permissions, not 0700.
    tmp = os.path.join(out, f'.{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}')
    os.mkdir(tmp)
    try:
      with sweeps.SweepReader(path, require_tracking=False) as reader:
        results[sweep_id] = _sweep_outputs(
            restored, sweep_id, reader, tmp, spacing_mm=spacing_mm, volume_format=volume_format,
            compounding=compounding, max_voxels=max_voxels)
      _replace_dir(tmp, final)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    table = (evaluate.format_table(results[sweep_id]) if results[sweep_id]
             else 'no tracking in the file: no metrics')
    print(f'{sweep_id} ({path})\n{table}\nWrote {final}\n')
  return results


def _run_sweep_model(restored: Restored, args: list[str]) -> None:
  f = flags.FLAGS
  if args:
    raise app.UsageError(f'Sweep models take --sweep or --dataset, not arguments: {args}')
  predict_sweeps(restored, sweep_paths=f.sweep or (), dataset=f.dataset, split=f.split,
                 registry=f.registry, out=f.out, spacing_mm=f.spacing_mm,
                 volume_format=f.volume_format, compounding=f.compounding,
                 max_voxels=f.max_voxels)


def read_image(path: str) -> np.ndarray:
  """An image file as (H, W) uint8 grayscale (colour becomes ITU-R 601 luminance, spec 3.1)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('L'))
  except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
    raise ValueError(f'{path}: cannot read the image ({e})') from e


def _segments(task: keypoint_tasks.Task) -> list[tuple[int, int]]:
  """The keypoint pairs drawn as segments: the measured distances, or the AoP's two arms."""
  if task.measurement == 'angle':
    a, vertex, b = keypoint_metrics.AOP_ANGLE_KEYPOINTS
    return [(vertex, a), (vertex, b)]
  return [(i, i + 1) for i in range(0, task.num_keypoints - 1, 2)]


def keypoint_overlay(image: np.ndarray, keypoints_px: np.ndarray, task: str,
                     measurements: dict[str, float], title: str = '') -> Figure:
  """The grayscale image with numbered keypoints, the measured segments and the values."""
  spec = keypoint_tasks.get_task(task)
  h, w = image.shape
  fig = Figure(figsize=(6.0, 6.0 * h / w + 0.6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_axes((0.0, 0.0, 1.0, h / (h + 0.1 * w)))
  # Pixel (i, j) covers [j, j + 1) x [i, i + 1): the keypoints' continuous coordinates.
  ax.imshow(image, cmap='gray', vmin=0, vmax=255, extent=(0, w, h, 0), interpolation='nearest')
  for a, b in _segments(spec):
    ax.plot(keypoints_px[[a, b], 0], keypoints_px[[a, b], 1], '-', color='yellow', lw=1.2)
  ax.plot(keypoints_px[:, 0], keypoints_px[:, 1], 'o', ms=4, mfc='red', mec='white', mew=0.6)
  for k, (x, y) in enumerate(keypoints_px):
    ax.annotate(str(k), (x, y), xytext=(3, 3), textcoords='offset points', color='cyan',
                fontsize=7)
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.axis('off')
  unit = {'angle': ' deg'}.get(spec.measurement, ' px')
  values = ', '.join(f'{k} {v:.1f}{unit}' for k, v in measurements.items())
  fig.suptitle(f'{title}\n{task}: {values}' if title else f'{task}: {values}', fontsize=8)
  return fig


def predict_images(restored: Restored, image_paths, task: str, *,
                   out: str | None = None) -> dict[str, dict[str, Any]]:
  """Keypoints and measurements of each image; writes the overlay and JSON (module docstring).

  Returns:
    {image path: {'keypoints_px', 'keypoints', 'measurements', 'image_hw'}}.
  """
  if not hasattr(restored.experiment, 'predict_image'):
    raise config_utils.ConfigError(
        f"{restored.checkpoint_dir}: config.experiment '{restored.config.experiment}' has no "
        'predict_image method, so it cannot predict keypoints')
  if not image_paths:
    raise ValueError('give at least one image file: python -m launch.predict IMAGE --task=TASK')
  spec = keypoint_tasks.get_task(task)
  images = {path: read_image(path) for path in image_paths}  # Every file is read before any work.
  out = out or os.path.join(restored.run_dir, 'predict', '_'.join(
      restored.checkpoint_dir.split(os.sep)[-2:]))
  os.makedirs(out, exist_ok=True)
  results = {}
  for path, image in images.items():
    result = restored.experiment.predict_image(restored.variables, image, spec.name)
    stem = plots.safe_filename(f'{os.path.splitext(os.path.basename(path))[0]}_{spec.name}')
    summary = {'image': path, 'task': spec.name, 'image_hw': list(image.shape),
               'keypoints_px': np.asarray(result['keypoints_px']).tolist(),
               'keypoints': np.asarray(result['keypoints']).tolist(),
               'measurements': result['measurements'], 'checkpoint': restored.checkpoint_dir,
               'step': restored.step}
    with open(os.path.join(out, f'{stem}.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    keypoint_overlay(image, np.asarray(result['keypoints_px']), spec.name,
                     result['measurements'], title=os.path.basename(path)).savefig(
                         os.path.join(out, f'{stem}.png'))
    rows = '\n'.join(f'  {k:>2}  {x:9.2f}  {y:9.2f}'
                      for k, (x, y) in enumerate(summary['keypoints_px']))
    unit = 'degrees' if spec.measurement == 'angle' else 'pixels'
    values = '\n'.join(f'  {k}: {v:.2f} {unit}' for k, v in result['measurements'].items())
    print(f'{path} ({image.shape[1]}x{image.shape[0]} pixels), task {spec.name}\n'
          f'keypoints (x, y) in pixels:\n{rows}\nmeasurements:\n{values}\n'
          f'Wrote {os.path.join(out, stem)}.png and .json\n')
    results[path] = summary
  return results


def _run_keypoint_model(restored: Restored, args: list[str]) -> None:
  f = flags.FLAGS
  if f.task is None:
    raise app.UsageError(f'--task is required for keypoint models; one of '
                         f'{", ".join(keypoint_tasks.TASK_NAMES)}')
  if f.sweep or f.dataset:
    raise app.UsageError('Keypoint models take image files as arguments, not --sweep/--dataset')
  predict_images(restored, args, f.task, out=f.out)


# Prediction entry point per model package (the first component of config.experiment).
_FAMILIES = {'dualtrack_jax': _run_sweep_model, 'sonichu_jax': _run_keypoint_model}


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('checkpoint', None, 'Run folder (best, else latest) or step folder.',
                      required=True)
  flags.DEFINE_multi_string('sweep', None, 'An h5 sweep file to predict (repeatable).')
  flags.DEFINE_string('dataset', None, "Registered dataset name, sweep CSV or 'synthetic'.")
  flags.DEFINE_enum('split', 'val', ['train', 'val', 'test'], 'Split of --dataset.')
  flags.DEFINE_string('registry', None, 'Dataset registry file (default: the usual lookup).')
  flags.DEFINE_string('out', None, 'Output folder (one subfolder per sweep).')
  flags.DEFINE_string('task', None, 'Keypoint models: the task of the images, e.g. fetal_femur.')
  flags.DEFINE_float('spacing_mm', 0.5, 'Voxel size of the reconstructed volume (mm).')
  flags.DEFINE_enum('volume_format', 'nii.gz', list(VOLUME_FORMATS), 'Volume file format.')
  flags.DEFINE_enum('compounding', 'pnn', list(volume_lib.METHODS),
                    'pnn: nearest voxel; trilinear: splat to 8 voxels (smoother, 6x slower).')
  flags.DEFINE_integer('max_voxels', volume_lib.DEFAULT_MAX_VOXELS,
                       'Refuse volumes with more voxels (use a larger --spacing_mm).')


def main(argv: list[str]) -> None:
  metric_writer.quiet_library_logs()
  try:
    restored = restore(flags.FLAGS.checkpoint)
    name = str(restored.config.get('experiment', ''))
    family = _FAMILIES.get(name.partition('.')[0])
    if family is None:
      raise config_utils.ConfigError(
          f"{restored.checkpoint_dir}: config.experiment '{name}' belongs to no model family "
          f'with predictions (known: {sorted(_FAMILIES)})')
    family(restored, argv[1:])
  except (FileNotFoundError, ValueError) as e:
    # Bad input (a missing or malformed file, dataset or flag value; SweepFileError, DatasetError
    # and ConfigError are ValueErrors): the message names it, a traceback would only hide it.
    raise SystemExit(f'launch.predict: error: {e}') from e


if __name__ == '__main__':
  define_flags()
  app.run(main)
