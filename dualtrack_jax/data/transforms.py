"""Label-preserving augmentations and preprocessing for one sweep item (NumPy, no framework).

An item is a dict of NumPy arrays describing a run of frames of one sweep:

| key              | shape / dtype       | meaning                                             |
|------------------|---------------------|-----------------------------------------------------|
| `images`         | (N, H, W) uint8     | frames for the local encoder                        |
| `global_images`  | (N, h, w), optional | global-encoder frames (reordered/flipped likewise)  |
| `tracking`       | (N, 4, 4) float64   | image (centred, mm) -> world                        |
| `indices`        | (N,) int            | frame positions given to the model                  |
| `pixel_to_image` | (4, 4) float64      | 0-based pixel (col, row, 0, 1) -> centred image mm  |

Item functions return a new dict (the input is never modified) whose arrays may be views of the
input's. Semantics follow the original `src/transform.py` (see docs/dualtrack.md, sections
"Input preprocessing" and "Augmentations"); where we deviate, the docstring says so and why. Random
transforms take an `np.random.Generator` (Grain's RandomMap gives one per element), so a pipeline
is reproducible from its seed.
"""
import dataclasses

import numpy as np

from dualtrack_jax import pose
from ultrasound_common import errors

IMAGE_KEYS = ('images', 'global_images')
# Arrays whose first axis is the frame axis; reordering/subsampling applies to all of them. The
# original never reorders its `sample_indices` when it plays a sweep backwards, so `indices` is
# deliberately absent from REVERSED_KEYS: positions stay ascending, as the model sees at inference.
FRAME_KEYS = ('images', 'global_images', 'tracking', 'indices')
REVERSED_KEYS = ('images', 'global_images', 'tracking')

GLOBAL_SIZE = (224, 224)
CONTEXT_BORDER = 50  # CropAndDownsampleForContextImages: CenterCrop(380, 540) of 480x640 frames.


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Probabilities of the original's augmentations (each drawn independently per item).

  Attributes:
    flip_p: horizontal flip of the images with the matching tracking change.
    reverse_p: play the sweep backwards.
    subsample_p: keep a sorted random subset of `keep_fraction` of the frames.
    keep_fraction: fraction of frames kept by the random subsampling.
    random_crop: random instead of centre crop for the local images.
  """
  flip_p: float = 0.5
  reverse_p: float = 0.5
  subsample_p: float = 0.0
  keep_fraction: float = 0.9
  random_crop: bool = True


# The original recipes (docs/dualtrack.md, sections "Training recipes", "TUS-REC 2025 finetuning").
LOCAL_AUGMENT = Augmentation()  # local_encoder_pretraining.py: flip, reverse, random 256 crop.
GLOBAL_AUGMENT = Augmentation(random_crop=False)  # global_encoder_pretraining.py: flip, reverse.
FUSION_2025_AUGMENT = Augmentation(subsample_p=0.5)  # get_transform.py::fusion_model_transform.


def horizontal_flip(item: dict) -> dict:
  """Mirrors the images along W and right-multiplies the tracking by diag(-1, 1, 1, 1).

  As the original's RandomHorizontalFlipImageAndTracking: exact when the image frame is centred
  (pixel_to_image maps pixel column (W-1)/2 to x = 0, as in the h5 format and after `crop`), since
  mirroring then maps image x to -x.
  """
  out = dict(item)
  for key in IMAGE_KEYS:
    if key in out:
      out[key] = out[key][..., ::-1]
  out['tracking'] = item['tracking'] * np.array([-1.0, 1.0, 1.0, 1.0])  # == T @ diag(-1, 1, 1, 1)
  return out


def reverse(item: dict) -> dict:
  """Plays the sweep backwards: reverses images, global images and tracking (not `indices`)."""
  out = dict(item)
  for key in REVERSED_KEYS:
    if key in out:
      out[key] = out[key][::-1]
  return out


def select_frames(item: dict, keep: np.ndarray) -> dict:
  """Keeps the frames at integer positions `keep` in every per-frame array (FRAME_KEYS)."""
  out = dict(item)
  for key in FRAME_KEYS:
    if key in out:
      out[key] = out[key][keep]
  return out


def random_subsample(item: dict, rng: np.random.Generator, keep_fraction: float = 0.9) -> dict:
  """Keeps a sorted random subset of int(N * keep_fraction) frames (RandomSubsampleSequence)."""
  n = len(item['tracking'])
  keep = np.sort(rng.permutation(n)[:int(n * keep_fraction)])
  if len(keep) < 2:
    raise errors.InputError(
        f'random_subsample: keeping {keep_fraction} of {n} frames leaves {len(keep)}, '
        'a sweep needs at least 2 frames')
  return select_frames(item, keep)


def center_crop_params(image_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int]:
  """(top, left) of torchvision's CenterCrop: round((H - h) / 2) with Python's half-to-even round.

  For 480x640 -> 256x256 this is rows 112:368, cols 192:448. (The original's
  CropAndUpdateTransforms floors instead; the two differ only when H - h or W - w is odd.)
  """
  _check_crop(image_hw, crop_hw)
  return (int(round((image_hw[0] - crop_hw[0]) / 2.0)),
          int(round((image_hw[1] - crop_hw[1]) / 2.0)))


def random_crop_params(rng: np.random.Generator, image_hw: tuple[int, int],
                       crop_hw: tuple[int, int]) -> tuple[int, int]:
  """(top, left) uniform over all crop positions inside the image (torchvision RandomCrop)."""
  _check_crop(image_hw, crop_hw)
  return (int(rng.integers(0, image_hw[0] - crop_hw[0] + 1)),
          int(rng.integers(0, image_hw[1] - crop_hw[1] + 1)))


def _check_crop(image_hw, crop_hw) -> None:
  if not (0 < crop_hw[0] <= image_hw[0] and 0 < crop_hw[1] <= image_hw[1]):
    raise errors.InputError(
        f'crop size {tuple(crop_hw)} does not fit in images of size {tuple(image_hw)}')


def centred_pixel_to_image(scale: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
  """(4, 4) pixel -> image mm for pixel scale (sx, sy, sz), origin at pixel ((W-1)/2, (H-1)/2)."""
  h, w = image_hw
  m = np.diag([*np.asarray(scale, np.float64), 1.0])
  m[0, 3] = -scale[0] * (w - 1) / 2
  m[1, 3] = -scale[1] * (h - 1) / 2
  return m


def crop(item: dict, top: int, left: int, crop_hw: tuple[int, int]) -> dict:
  """Crops `images` and re-expresses tracking and pixel_to_image in the crop's centred frame.

  As the original's CropAndUpdateTransforms, the tracking is right-multiplied by
  crop_to_image = pixel_to_image @ Translate(left, top) @ inv(pixel_to_image_crop), so a crop pixel
  maps to the same world point as the image pixel it came from. The crop frame is centred at pixel
  ((w-1)/2, (h-1)/2), the convention of the h5 format; the original centres it at (w/2, h/2), half a
  pixel off, which would make a later flip inexact and the centre crop of a centred frame not the
  identity. The targets differ from the original's by (R - I) * 0.5 px, below 0.01 mm.
  """
  h, w = crop_hw
  _check_crop(item['images'].shape[-2:], crop_hw)
  p_in = np.asarray(item['pixel_to_image'], np.float64)
  if np.any(p_in[:3, :3] != np.diag(np.diag(p_in[:3, :3]))):
    raise errors.InputError(f'crop: pixel_to_image must be an axis-aligned scale plus translation, '
                            f'got {p_in.tolist()}')
  scale = np.diag(p_in)[:3]
  p_crop = centred_pixel_to_image(scale, crop_hw)
  image_crop_to_pixel = np.diag([*(1.0 / scale), 1.0])  # inv(p_crop), written out exactly
  image_crop_to_pixel[:2, 3] = [(w - 1) / 2 + left, (h - 1) / 2 + top]  # incl. Translate(left, top)
  crop_to_image = p_in @ image_crop_to_pixel
  out = dict(item)
  out['images'] = item['images'][..., top:top + h, left:left + w]
  out['tracking'] = item['tracking'] @ crop_to_image
  out['pixel_to_image'] = p_crop
  return out


def center_crop(item: dict, crop_hw: tuple[int, int]) -> dict:
  """`crop` at torchvision's CenterCrop position."""
  return crop(item, *center_crop_params(item['images'].shape[-2:], crop_hw), crop_hw)


def random_crop(item: dict, rng: np.random.Generator, crop_hw: tuple[int, int]) -> dict:
  """`crop` at a uniformly random position."""
  return crop(item, *random_crop_params(rng, item['images'].shape[-2:], crop_hw), crop_hw)


def augment(item: dict, rng: np.random.Generator, aug: Augmentation) -> dict:
  """Applies reverse, subsampling and flip, each with its probability (not the crop).

  The original applies them in loader-specific orders (local: flip, reverse; 2025 fusion: reverse,
  subsample, flip); flips commute with both and reversal commutes with subsampling in distribution,
  so one fixed order serves every recipe.
  """
  if rng.random() < aug.reverse_p:
    item = reverse(item)
  if rng.random() < aug.subsample_p:
    item = random_subsample(item, rng, aug.keep_fraction)
  if rng.random() < aug.flip_p:
    item = horizontal_flip(item)
  return item


def to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1], as torch's `tensor(uint8) / 255.0`."""
  return images.astype(np.float32) / np.float32(255.0)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 weights of PIL/torchvision antialiased bilinear resampling.

  Output pixel i has centre c = (i + 0.5) * s in input pixel units (s = in / out, pixel-centre
  alignment); the triangle filter is widened to support max(s, 1) when downsampling (antialias)
  and restricted to the input pixels [trunc(c - support + 0.5), trunc(c + support + 0.5)) clipped
  to the image, and the weights are normalised per output pixel (so borders are renormalised,
  not zero-padded). This is PIL's `precompute_coeffs` and torch's `_upsample_bilinear2d_aa`.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = filterscale  # the triangle's own support is 1
  centre = (np.arange(out_size) + 0.5) * scale
  # C casts truncate towards zero; clipping at 0 makes that the same as floor here.
  lo = np.maximum(np.floor(centre - support + 0.5), 0)
  hi = np.minimum(np.floor(centre + support + 0.5), in_size)
  j = np.arange(in_size)
  x = (j[None, :] - centre[:, None] + 0.5) * (1.0 / filterscale)
  weights = np.maximum(1.0 - np.abs(x), 0.0)
  weights = np.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), weights, 0.0)
  total = weights.sum(axis=1, keepdims=True)
  return weights / np.where(total == 0, 1.0, total)


def resize(images: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Antialiased bilinear resize of the last two axes, as torchvision `Resize(out_hw)` on floats.

  Separable: width first, then height (PIL's order), in float32. Inside a jitted step the same
  matrices apply as `jnp.einsum('...hw,Hh,Ww->...HW', x, resize_matrix(h, H), resize_matrix(w, W))`.
  """
  images = np.asarray(images, np.float32)
  h, w = images.shape[-2:]
  rows = resize_matrix(h, out_hw[0]).astype(np.float32)
  cols = resize_matrix(w, out_hw[1]).astype(np.float32)
  return np.matmul(rows, np.matmul(images, cols.T))


def context_images(images: np.ndarray, border: int = CONTEXT_BORDER,
                   out_hw: tuple[int, int] = GLOBAL_SIZE) -> np.ndarray:
  """Crops `border` pixels from every side, then `resize` (CropAndDownsampleForContextImages).

  For 480x640 frames this is the original's CenterCrop((380, 540)) + Resize((224, 224)), the
  on-the-fly equivalent of the stored 'images_downsampled-224' (which used skimage instead).
  """
  h, w = images.shape[-2:]
  if not (2 * border < h and 2 * border < w):
    raise errors.InputError(
        f'context_images: a {border}-px border does not fit in frames of {(h, w)}')
  return resize(images[..., border:h - border, border:w - border], out_hw)


def add_targets(item: dict) -> dict:
  """Adds float32 6-DoF targets computed from the (augmented) tracking, as Add6DOFTargets.

  'targets' (N-1, 6): pose vectors of T_k^-1 T_{k+1}; 'targets_global' (N-1, 6): pose vectors of
  T_0^-1 T_i for i >= 1 (the identity of frame 0 is skipped, as in the original).
  """
  tracking = item['tracking']
  out = dict(item)
  out['targets'] = pose.relative_pose_vectors(tracking).astype(np.float32)
  out['targets_global'] = pose.global_pose_vectors(tracking)[1:].astype(np.float32)
  return out
