"""DualTrack as deployable functions: the export specs of its experiments (`launch.export`).

Both functions take what a scanner gives, the raw uint8 frames of sweeps, (b, n, H, W) with the
frame size fixed at export (option frame_size=HxW), and do inside what prediction does on the
host: the centre crop to `config.data.crop` scaled to [0, 1] (the local branch) and, for the
whole model, the global encoder's frames at `regular_grid_indices` (every `grid_spacing`-th
frame from 0) resized to 224 x 224 (antialiased bilinear, `transforms.resize`; after a 50-pixel
border crop for global_source 'context') and normalised by config.data.global_normalize. Out come
the relative pose vectors (b, n-1, 6) and the composed global transforms (b, n, 4, 4), in the
crop's centred image frame (metadata 'caller_must' says how to move them into the file's).

The batch and the number of frames are symbolic: one artifact serves every batch size and sweep
length from 2 frames up to the position tables' max_positions (the whole model) or the option
max_frames (the stage-1 encoder, which has no position table). What makes n symbolic:
- The sweeps of a batch run through the model one at a time (vmap), so the model sees a batch of
  one, and its 3D convolutions run in one pass (`resnet3d.unchunked`): the frame chunking of
  `resnet3d.frame_conv` chooses between a loop and one pass from a comparison of n with a bound
  that a symbolic n cannot decide. The result is the same; memory grows with n (no tiling).
- `DualTrack` gathers the global frames by a strided slice and computes their indices with
  `jnp.arange`, so a symbolic n traces; the bounds on n become the export's shape constraints.
- The CNN runs in one pass over the sweep: exact tiling (`cnn_chunking='exact_tiling'`) equals
  it, and the 2025 model's `torch.chunk` chunking equals it up to `max_subsequence` frames (so n
  is bounded by that too); longer chunked sweeps would need a concrete n.

Option fold_batch_norm=true ships the CNNs' BatchNorm folded into their convolutions (the same
function; docs/performance.md).
"""
from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax import pose
from dualtrack_jax.data import transforms
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import local_encoder
from dualtrack_jax.models import resnet3d
from ultrasound_common import errors

# Sweeps the stage-1 export accepts by default (it has no position table to bound them).
DEFAULT_MAX_FRAMES = 4096
GLOBAL_SOURCES = ('resize', 'context')
# Facts about n >= 1 that jax's symbolic shape reasoning cannot derive (it bounds n^2 by
# intervals), needed by the relative-key attention's reshapes of its (n, 2n - 1) scores.
_RELATIVE_KEY_CONSTRAINTS = ('2*n*n - n >= 0', '2*n*n - n - 1 >= 0')
POSE_VECTOR = ('[tx, ty, tz] in mm, [rx, ry, rz] in degrees, R = Rz(rz) Ry(ry) Rx(rx) (SciPy '
               'extrinsic "xyz"); row k is the motion T_k^-1 T_{k+1} from frame k+1 to frame k')


def _frame_size(options: Mapping[str, str], crop: tuple[int, int]) -> tuple[int, int]:
  text = options.get('frame_size')
  if text is None:
    raise errors.InputError(
        f'export option frame_size=HxW is required: the size of the raw frames the '
        f'function takes (e.g. 480x640); the model sees their {crop[0]}x{crop[1]} '
        'centre crop')
  match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
  if not match:
    raise errors.InputError(f'export option frame_size={text!r}: expected HxW, e.g. 480x640')
  size = int(match.group(1)), int(match.group(2))
  if size[0] < crop[0] or size[1] < crop[1]:
    raise errors.InputError(
        f'export option frame_size={text}: frames of {size[0]}x{size[1]} are smaller '
        f'than the {crop[0]}x{crop[1]} centre crop this model was trained on')
  return size


def _int_option(options: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
  text = options.get(key, str(default))
  if not re.fullmatch(r'\s*\d+\s*', text) or not low <= int(text) <= high:
    raise errors.InputError(f'export option {key}={text!r}: expected an integer in [{low}, {high}]')
  return int(text)


def _fold_option(options: Mapping[str, str]) -> bool:
  text = options.get('fold_batch_norm', 'false')
  if text.strip().lower() not in ('true', 'false'):
    raise errors.InputError(f'export option fold_batch_norm={text!r}: expected true or false')
  return text.strip().lower() == 'true'


def _local_frames(frames: jax.Array, frame_hw: tuple[int, int], crop: tuple[int, int]):
  """(b, n, H, W) uint8 -> the local centre crops in [0, 1] (b, n, h, w) float32."""
  top, left = transforms.center_crop_params(frame_hw, crop)
  return frames[:, :, top:top + crop[0], left:left + crop[1]].astype(jnp.float32) / 255.0


def _global_transforms(vectors: jax.Array) -> jax.Array:
  """(b, n-1, 6) relative pose vectors -> (b, n, 4, 4) float32 global transforms, G_0 = I.

  A sequential scan: `pose.compose_relative`'s associative scan needs a concrete n.
  """
  relative = jnp.moveaxis(pose.pose_vector_to_matrix(vectors), 1, 0)  # (n-1, b, 4, 4)
  eye = jnp.broadcast_to(jnp.eye(4, dtype=relative.dtype), relative.shape[1:])
  _, composed = jax.lax.scan(lambda g, r: (pose.matmul(g, r),) * 2, eye, relative)
  return jnp.concatenate([eye[:, None], jnp.moveaxis(composed, 0, 1)], axis=1)


def _outputs() -> dict[str, str]:
  return {
      'relative_pose_vectors': f'(b, n-1, 6) float32: {POSE_VECTOR}, in the crop\'s centred '
                               'image frame',
      'global_transforms': '(b, n, 4, 4) float32: frame i into frame 0 (G_0 = I), the relative '
                           'motions composed in float32 in the crop\'s centred image frame',
  }


def _frames_input(frame_hw: tuple[int, int]) -> dict[str, Any]:
  return dict(name='frames', shape=('b', 'n', *frame_hw), dtype='uint8',
              description='b sweeps of n raw grayscale frames (uint8, as stored in the sweep '
                          f'file), each {frame_hw[0]}x{frame_hw[1]} pixels')


def _local_metadata(frame_hw: tuple[int, int], crop: tuple[int, int]) -> dict[str, Any]:
  """The local preprocessing and what the caller does with the outputs."""
  top, left = transforms.center_crop_params(frame_hw, crop)
  # The crop's centre minus the frame's, in pixels (x, y): nonzero (half a pixel) where the
  # frame and crop sizes differ by an odd number of pixels.
  offset = [left + (crop[1] - 1) / 2 - (frame_hw[1] - 1) / 2,
            top + (crop[0] - 1) / 2 - (frame_hw[0] - 1) / 2]
  return {
      'frame_size': list(frame_hw),
      'local_crop': {'top': top, 'left': left, 'height': crop[0], 'width': crop[1]},
      'local_scale': 'uint8 / 255 (float32 in [0, 1])',
      'pose_vector': POSE_VECTOR,
      'image_frame': 'image coordinates in mm centred on the image (a 0-based pixel (column, row) '
                     'is at ((column - (W - 1) / 2) sx, (row - (H - 1) / 2) sy, 0)): x lateral, '
                     'y axial (down), z = x cross y',
      'crop_centre_offset_px': offset,
      'caller_must': [
          'give frames of exactly frame_size pixels (resample other sizes first: the model '
          'expects the pixel spacing it was trained on)',
          'the outputs are motions in the centred frame of the local crop; with pixel spacing '
          '(sx, sy) mm that frame is the file\'s centred frame translated by C = T(sx dx, sy dy, '
          '0), (dx, dy) = crop_centre_offset_px: a relative transform M becomes C M C^-1 and a '
          'global transform G becomes C G C^-1 in the file\'s frame (identity when both offsets '
          'are 0)',
          'compose the relative pose vectors in float64 for long sweeps if the float32 '
          'global_transforms drift too much for the application',
      ],
  }


def stage1_spec(model: local_encoder.LocalEncoderStage1, variables: Mapping[str, Any],
                crop: tuple[int, int], options: Mapping[str, str]) -> dict[str, Any]:
  """The export spec of a stage-1 local encoder (`local_stage1.Experiment.export_spec`)."""
  frame_hw = _frame_size(options, crop)
  max_frames = _int_option(options, 'max_frames', DEFAULT_MAX_FRAMES, 2, 2**31 - 1)
  fold = _fold_option(options)
  if fold:
    model = model.clone(fold_batch_norm=True)
    variables = resnet3d.fold_batch_norm(variables)

  def sweep(variables, images):
    with resnet3d.unchunked():
      return model.apply(variables, images[None])[0]

  def fn(variables, frames):
    vectors = jax.vmap(lambda x: sweep(variables, x))(_local_frames(frames, frame_hw, crop))
    return {'relative_pose_vectors': vectors, 'global_transforms': _global_transforms(vectors)}

  return dict(
      fn=fn, variables=variables, inputs=[_frames_input(frame_hw)], outputs=_outputs(),
      constraints=('n >= 2', f'n <= {max_frames}'),
      options={'frame_size': f'{frame_hw[0]}x{frame_hw[1]}', 'max_frames': str(max_frames),
               'fold_batch_norm': str(fold).lower()},
      metadata={**_local_metadata(frame_hw, crop), 'model': 'DualTrack local encoder, stage 1',
                'max_frames': f'{max_frames}: the CNN runs over the whole sweep in one pass, so '
                              'memory grows with n; export again with --option max_frames=N '
                              'for longer sweeps'})


def sweep_spec(model_kwargs: Mapping[str, Any], variables: Mapping[str, Any],
               crop: tuple[int, int], global_source: str,
               global_normalize: tuple[float, float],
               options: Mapping[str, str]) -> dict[str, Any]:
  """The export spec of the whole DualTrack model (`fusion.Experiment.export_spec`).

  Args:
    model_kwargs: the DualTrack keyword arguments (the run's config.model and dtype).
    variables: the run's variables.
    crop: config.data.crop.
    global_source: config.data.global_source; option global_source overrides it.
    global_normalize: config.data.global_normalize, (mean, std).
    options: the export options (frame_size, global_source, fold_batch_norm).
  """
  frame_hw = _frame_size(options, crop)
  fold = _fold_option(options)
  if fold:
    model_kwargs = {**model_kwargs, 'fold_batch_norm': True}
    variables = dualtrack.fold_batch_norm(variables)
  source = options.get('global_source', global_source)
  if source not in GLOBAL_SOURCES:
    raise errors.InputError(
        f"global source {source!r} (config.data.global_source, or export option global_source) "
        "cannot be computed inside the function: 'downsampled' reads the sweep file's stored "
        "'images_downsampled-224' frames. Export with --option global_source=context (the same "
        'preprocessing computed from the raw frames: 50-pixel border crop and antialiased '
        "bilinear resize) or global_source=resize (the whole frame resized); supported: "
        f'{", ".join(GLOBAL_SOURCES)}')
  border = transforms.CONTEXT_BORDER if source == 'context' else 0
  if source == 'context' and not (2 * border < frame_hw[0] and 2 * border < frame_hw[1]):
    raise errors.InputError(
        f'export option frame_size={frame_hw[0]}x{frame_hw[1]}: the {border}-pixel '
        "border crop of global_source 'context' does not fit")
  m = dualtrack.DualTrack(**model_kwargs)
  # The global frames' resize: constant matrices of the fixed frame size (not weights).
  inner = (frame_hw[0] - 2 * border, frame_hw[1] - 2 * border)
  rows = transforms.resize_matrix(inner[0], transforms.GLOBAL_SIZE[0]).astype(np.float32)
  cols = transforms.resize_matrix(inner[1], transforms.GLOBAL_SIZE[1]).astype(np.float32)
  mean, std = (float(v) for v in global_normalize)
  max_frames = m.max_positions
  if m.cnn_chunking == 'torch_chunk':
    max_frames = min(max_frames, m.max_subsequence)
  # One pass of the CNN (module docstring): the same poses as either chunking up to max_frames.
  sweep_model = dualtrack.DualTrack(**{**model_kwargs, 'cnn_chunking': None,
                                       'max_subsequence': None})

  def global_frames(frames):
    x = frames[:, ::m.grid_spacing].astype(jnp.float32) / 255.0
    x = x[..., border:frame_hw[0] - border, border:frame_hw[1] - border]
    highest = jax.lax.Precision.HIGHEST  # As NumPy's float32 matmul of `transforms.resize`.
    x = jnp.matmul(rows, jnp.matmul(x, cols.T, precision=highest), precision=highest)
    return (x - mean) / std

  def sweep(variables, local, grid):
    with resnet3d.unchunked():
      return sweep_model.apply(variables, local[None], grid[None])[0]

  def fn(variables, frames):
    vectors = jax.vmap(lambda x, g: sweep(variables, x, g))(
        _local_frames(frames, frame_hw, crop), global_frames(frames))
    return {'relative_pose_vectors': vectors, 'global_transforms': _global_transforms(vectors)}

  options = {'frame_size': f'{frame_hw[0]}x{frame_hw[1]}', 'global_source': source,
             'fold_batch_norm': str(fold).lower()}
  metadata = {
      **_local_metadata(frame_hw, crop), 'model': 'DualTrack (local and global encoders, fusion)',
      'global_frames': {
          'source': source, 'indices': f'0, {m.grid_spacing}, {2 * m.grid_spacing}, ... < n',
          'border_crop_px': border, 'size': list(transforms.GLOBAL_SIZE),
          'resize': 'antialiased bilinear (PIL / torchvision Resize on floats) of uint8 / 255',
          'normalize': {'mean': mean, 'std': std}},
      'max_frames': f'{max_frames}: ' + (
          'the CNN chunking of this model (torch.chunk beyond max_subsequence) needs a concrete '
          'n for longer sweeps' if max_frames < m.max_positions else
          'the position tables (max_positions)'),
  }
  if source != global_source:
    metadata['global_frames']['note'] = (f'the run was trained with global_source '
                                         f'{global_source!r}; the function computes {source!r}')
  return dict(fn=fn, variables=variables, inputs=[_frames_input(frame_hw)], outputs=_outputs(),
              constraints=('n >= 2', f'n <= {max_frames}', *_RELATIVE_KEY_CONSTRAINTS),
              options=options, metadata=metadata)
