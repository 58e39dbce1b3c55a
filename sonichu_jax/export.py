"""SONICHU as a deployable function: the export spec of its keypoint experiment (`launch.export`).

In: images already stretched to 256 x 256 and scaled to [0, 1], (b, 256, 256, 3) float32 (gray
replicated to three channels); the ImageNet normalisation happens inside. The resize from each
image's own size stays outside, because every image has its own size: the manifest's metadata
describes it (`sonichu_jax.preprocess`: bilinear with half-pixel centres and no antialiasing,
cv2.INTER_LINEAR, on the [0, 1] float image). Taking [0, 1] floats rather than uint8 keeps the
result equal to `launch.predict`'s, which resizes the float image (a uint8 resize would round).

Out: one output per exported task, `keypoints_<task>` (b, K, 2) normalised (x, y); pixels of the
original image are (x W0, y H0). One function with one output per task, rather than one function
per task: the backbone, nearly all of the compute, runs once for all of them, and the artifact
stays one module with one signature. Each task's head costs about 8 % of the backbone, so the
option tasks=A,B exports (and ships the variables of) only the heads a deployment serves; the
default is the run's config.data.tasks (all nine when empty). Flip test-time augmentation follows
config.eval_tta (option flip_tta=true|false overrides it) and doubles the compute. Option
fold_batch_norm=true ships the heads' BatchNorm folded into their deconvolutions (the same
function; docs/performance.md).
"""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sonichu_jax import preprocess
from sonichu_jax import tasks as tasks_lib
from sonichu_jax.models import heads as heads_lib
from sonichu_jax.models import sonichu
from ultrasound_common import errors

_BOOLEANS = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}


def _keypoints(model: sonichu.SonichuModel, images: jax.Array, tta: bool) -> dict[str, jax.Array]:
  """{'keypoints_<task>': (B, K, 2)} of every head of `model`, the backbone run once."""
  batch = images.shape[0]
  both = jnp.concatenate([images, images[:, :, ::-1]], axis=0) if tta else images
  features = model.backbone(both)
  out = {}
  for name in model.tasks:
    coords = heads_lib.soft_argmax(model.heads[name](features), model.temperature)
    if tta:
      mirrored = sonichu.unflip_keypoints(coords[batch:], tasks_lib.get_task(name))
      coords = 0.5 * (coords[:batch] + mirrored)
    out[f'keypoints_{name}'] = coords
  return out


def keypoints_spec(model: sonichu.SonichuModel, variables: Mapping[str, Any],
                   config_tasks: tuple[str, ...], flip_tta: bool,
                   options: Mapping[str, str]) -> dict[str, Any]:
  """The export spec of a SONICHU run (`keypoints.Experiment.export_spec`).

  Args:
    model: the run's SonichuModel (every head).
    variables: its variables.
    config_tasks: config.data.tasks (empty: all nine), the default of option tasks.
    flip_tta: config.eval_tta, the default of option flip_tta.
    options: the export options (tasks, flip_tta, fold_batch_norm).
  """
  text = options.get('tasks')
  names = tuple(t.strip() for t in text.split(',') if t.strip()) if text is not None else (
      tuple(config_tasks) or tasks_lib.TASK_NAMES)
  for name in names:
    try:
      tasks_lib.get_task(name)
    except ValueError as e:
      raise errors.InputError(f'export option tasks={text}: {e}') from None
  if not names or len(set(names)) != len(names):
    raise errors.InputError(
        f'export option tasks={text!r}: expected distinct task names, e.g. HC,FA')
  tta_text = options.get('flip_tta', str(bool(flip_tta)).lower())
  if tta_text.lower() not in _BOOLEANS:
    raise errors.InputError(f'export option flip_tta={tta_text!r}: expected true or false')
  tta = _BOOLEANS[tta_text.lower()]
  fold_text = options.get('fold_batch_norm', 'false')
  if fold_text.lower() not in _BOOLEANS:
    raise errors.InputError(f'export option fold_batch_norm={fold_text!r}: expected true or false')
  fold = _BOOLEANS[fold_text.lower()]
  reduced = model.clone(parent=None, tasks=names, fold_batch_norm=fold)
  keep = {'backbone', *(f'heads_{name}' for name in names)}
  shipped = {collection: {k: v for k, v in tree.items() if k in keep}
             for collection, tree in variables.items()}
  if fold:
    shipped = sonichu.fold_batch_norm(shipped)
  size = preprocess.IMAGE_SIZE
  mean, std = preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD

  def fn(variables, images):
    normalised = ((images - mean) / std).astype(model.dtype)
    return reduced.apply(variables, normalised, tta, method=_keypoints)

  task_info = {t.name: {'num_keypoints': t.num_keypoints,
                        'flip_pairs': [list(p) for p in t.flip_pairs],
                        'measurement': t.measurement, 'description': t.description}
               for t in map(tasks_lib.get_task, names)}
  return dict(
      fn=fn, variables=shipped,
      inputs=[dict(name='images', shape=('b', size, size, 3), dtype='float32',
                   description=f'b images stretched to {size}x{size} and scaled to [0, 1] (RGB, '
                               'or gray replicated to 3 channels); not yet normalised')],
      outputs={f'keypoints_{t}': f'(b, {task_info[t]["num_keypoints"]}, 2) float32: {t} '
                                 'keypoints, normalised (x, y) in (0, 1) of the image'
               for t in names},
      options={'tasks': ','.join(names), 'flip_tta': str(tta).lower(),
               'fold_batch_norm': str(fold).lower()},
      metadata={
          'model': 'SONICHU (ViT backbone, one ViTPose head per task)',
          'tasks': task_info, 'flip_tta': tta,
          'image_size': [size, size],
          'normalize_inside': {'mean': mean.tolist(), 'std': std.tolist(),
                               'formula': '(x - mean) / std per channel (ImageNet)'},
          'caller_must': [
              'turn gray (H, W) images into 3 channels by replicating them; keep RGB as RGB',
              'scale uint8 to float32 [0, 1] (x / 255), then stretch each image to '
              f'{size}x{size} without keeping the aspect ratio: bilinear, half-pixel centres, '
              'no antialiasing (cv2.resize INTER_LINEAR on the float image, torch '
              "interpolate(mode='bilinear', align_corners=False))",
              'map keypoints back to original pixels as (x W0, y H0) (the resize is a stretch, '
              'not a letterbox)',
          ],
      })
