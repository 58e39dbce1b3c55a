"""SONICHU input preprocessing, and its outputs back in image pixels (as the model card says).

An image of any size becomes a (256, 256, 3) float32 array: grayscale is replicated to three
channels (RGB stays RGB, as the card says), the image is stretched to 256 x 256 without keeping the
aspect ratio, scaled to [0, 1] and normalised with the ImageNet mean and std. The model's normalised
keypoints then map back by x * W0, y * H0 (the card's `kps_norm * [orig_w, orig_h]`), which is right
because the resize is a stretch, not a letterbox (docs/sonichu.md, section "Preprocessing").

The resize is bilinear with half-pixel centres and no antialiasing: OpenCV's INTER_LINEAR (the
default of `cv2.resize`; the card's example code reads images with OpenCV) and torch's
`interpolate(mode='bilinear', align_corners=False)`. (The exact interpolation of SONICHU's
preprocessor is unpublished: docs/sonichu.md, section "Unpublished details and our choices".) It
is NumPy, for the host-side data pipeline where every image has its own size.
"""
import numpy as np
from PIL import Image

from ultrasound_common import errors

IMAGE_SIZE = 256
# Larger images are refused before they are decoded (the largest ultrasound frames are a few
# megapixels; PIL's own guard would only raise its DecompressionBombError at 179 megapixels).
MAX_IMAGE_PIXELS = 64 * 2**20
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_gray(path: str) -> np.ndarray:
  """An image file as (H, W) uint8 grayscale, whatever its bit depth and channels.

  8-bit images: colour becomes ITU-R 601 luma (PIL's 'L' mode), alpha is dropped. 16-bit
  grayscale (PNG, TIFF) is scaled to 8 bits (v * 255 / 65535, rounded), not clipped at 255 as
  PIL's conversion would. 32-bit integer and float images have no agreed range and are refused.
  Errors (unreadable, too large, unsupported mode) name the file.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      if width * height > MAX_IMAGE_PIXELS:
        raise errors.InputError(f'{path}: the image declares {width}x{height} pixels, more than '
                                f'the {MAX_IMAGE_PIXELS // 2**20} megapixels this reader accepts')
      if image.mode in ('I;16', 'I;16B', 'I;16L'):
        pixels = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return np.rint(pixels).astype(np.uint8)
      if image.mode in ('I', 'F'):
        raise errors.InputError(f'{path}: {image.mode!r} images (32-bit integer or float '
                                'pixels) have no agreed grey range; save it as 8 or 16 bits')
      return np.asarray(image.convert('L'))
  except Image.DecompressionBombError as e:  # PIL's own, larger limit, checked on opening.
    raise errors.InputError(f'{path}: the image is too large ({e})') from e
  except (OSError, ValueError) as e:
    if isinstance(e, errors.Error):
      raise
    # PIL's UnidentifiedImageError is an OSError; truncated data also fails here.
    raise errors.InputError(f'{path}: cannot read the image ({e})') from e


def _resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (lo, hi) and weight of hi per output position; half-pixel centres, clamped."""
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0.0, in_size - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of an (H, W, C) float array to (size[0], size[1], C), as cv2.INTER_LINEAR."""
  h_lo, h_hi, h_w = _resize_weights(image.shape[0], size[0])
  w_lo, w_hi, w_w = _resize_weights(image.shape[1], size[1])
  rows = image[h_lo] * (1 - h_w)[:, None, None] + image[h_hi] * h_w[:, None, None]
  return rows[:, w_lo] * (1 - w_w)[None, :, None] + rows[:, w_hi] * w_w[None, :, None]


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
  """Turns one image into the model's input.

  Args:
    image: (H, W), (H, W, 1) or (H, W, 3) RGB; uint8 in [0, 255], or floating point in [0, 1].
    size: side of the square model input.

  Returns:
    (size, size, 3) float32 normalised image, and the original (H, W) for `to_pixels`.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or min(image.shape[:2]) < 1:
    raise errors.InputError(
        f'preprocess: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape '
        f'{image.shape}')
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  elif np.issubdtype(image.dtype, np.floating):
    if not np.all(np.isfinite(image)):
      raise errors.InputError('preprocess: the image has NaN or infinite values')
    if image.min() < 0.0 or image.max() > 1.0:
      raise errors.InputError('preprocess: a floating-point image must be in [0, 1], got range '
                              f'[{image.min()}, {image.max()}]; pass uint8 for [0, 255] images')
    image = image.astype(np.float32)
  else:
    raise errors.InputError(
        f'preprocess: image dtype must be uint8 or floating point, got {image.dtype}')
  orig_hw = image.shape[:2]
  # Resizing one channel and replicating it equals replicating first: the resize is per channel.
  image = resize_bilinear(image, (size, size))
  image = np.broadcast_to(image, (size, size, 3))
  return ((image - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32), orig_hw


def to_pixels(keypoints: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
  """Scales (..., K, 2) normalised (x, y) keypoints to original-image pixels: (x W0, y H0)."""
  h, w = orig_hw
  return np.asarray(keypoints, np.float64) * np.array([w, h], np.float64)


def to_normalised(keypoints: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
  """Inverse of `to_pixels`: (..., K, 2) pixel keypoints to normalised (x / W0, y / H0)."""
  h, w = orig_hw
  return np.asarray(keypoints, np.float64) / np.array([w, h], np.float64)
