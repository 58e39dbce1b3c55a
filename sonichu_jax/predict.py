"""Keypoints of image files, for `launch.predict IMAGE [IMAGE ...] --task=TASK` (`interface.py`).

Each image's keypoints are printed in its own pixels with the task's measurements (pixels, or
degrees for the angle of progression), and written as
  <image>_<task>.png   the image with the keypoints (numbered) and the measured segments
  <image>_<task>.json  keypoints (pixels and normalised), measurements, image size, checkpoint
"""
import json
import os
from typing import Any

import numpy as np

from sonichu_jax import plots
from sonichu_jax import preprocess
from sonichu_jax import tasks
from ultrasound_common import errors

def plan(run: Any, image_paths, task: str | None):
  """One (name, write) per image, after every image has been read and the task checked.

  `write(folder, name)` writes `<name>.json` and `<name>.png` (module docstring) into `folder`
  and returns (the keypoints and measurements as text, {}); the name is `<image>_<task>`.
  """
  if not hasattr(run.experiment, 'predict_image'):
    raise errors.InputError(
        f"{run.checkpoint_dir}: config.experiment '{run.config.experiment}' has no "
        'predict_image method, so it cannot predict keypoints')
  if task is None:
    raise errors.InputError(f'--task is required for keypoint models; one of '
                            f'{", ".join(tasks.TASK_NAMES)}')
  if not image_paths:
    raise errors.InputError(
        'give at least one image file: python -m launch.predict IMAGE --task=TASK')
  spec = tasks.get_task(task)
  # Every file is read before any work.
  images = {path: preprocess.read_gray(path) for path in image_paths}

  def writer(path: str, image: np.ndarray):
    def write(folder: str, name: str) -> tuple[str, dict[str, float]]:
      result = run.experiment.predict_image(run.variables, image, spec.name)
      keypoints_px = np.asarray(result['keypoints_px'])
      summary = {'image': path, 'task': spec.name, 'image_hw': list(image.shape),
                 'keypoints_px': keypoints_px.tolist(),
                 'keypoints': np.asarray(result['keypoints']).tolist(),
                 'measurements': result['measurements'], 'checkpoint': run.checkpoint_dir,
                 'step': run.step}
      with open(os.path.join(folder, f'{name}.json'), 'w') as f:
        json.dump(summary, f, indent=2)
      plots.keypoint_overlay(image, keypoints_px, spec.name, result['measurements'],
                             title=os.path.basename(path)).savefig(
                                 os.path.join(folder, f'{name}.png'))
      rows = '\n'.join(f'  {k:>2}  {x:9.2f}  {y:9.2f}' for k, (x, y) in enumerate(keypoints_px))
      unit = 'degrees' if spec.measurement == 'angle' else 'pixels'
      values = '\n'.join(f'  {k}: {v:.2f} {unit}' for k, v in result['measurements'].items())
      return (f'{path} ({image.shape[1]}x{image.shape[0]} pixels), task {spec.name}\n'
              f'keypoints (x, y) in pixels:\n{rows}\nmeasurements:\n{values}'), {}
    return write

  return [(f'{os.path.splitext(os.path.basename(path))[0]}_{spec.name}', writer(path, image))
          for path, image in images.items()]
