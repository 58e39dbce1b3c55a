"""Keypoint-preserving augmentations and the model input of one annotated image (NumPy).

`prepare` turns an image of any size with its keypoints in original pixels into what the model
sees: the (256, 256, 3) ImageNet-normalised input of `sonichu_jax.preprocess` and normalised
keypoints (x / W, y / H). Without augmentation it is exactly `preprocess.preprocess` (evaluation,
prediction).

With augmentation (training) the image is first stretched to 256 x 256 by the same resize, then:

1. a horizontal flip (probability `flip_p`; not for the views in `no_flip_tasks`), keypoints
   mirrored and swapped through the task's flip pairs (`sonichu_jax.tasks`);
2. a random similarity about the image centre (rotation, isotropic scale, translation), defined in
   the ORIGINAL image's pixel geometry, so a rotation of a non-square image stays a rotation (in
   the stretched 256 x 256 frame it is conjugated by the stretch); the image is resampled
   bilinearly (zeros outside) and the keypoints go through the same matrix. A draw that would push
   a visible keypoint out of the image is redrawn (up to `max_tries`, else no similarity), because
   the soft-argmax can only predict inside it;
3. intensity: gamma, contrast, brightness and Gaussian noise on the [0, 1] image.

Flip and similarity are one resampling. Geometry uses continuous coordinates, the image spanning
[0, 256]^2: pixel (i, j) is the value at (j + 0.5, i + 0.5), so a flip is x -> 256 - x and
normalised keypoints are coordinates / 256.
"""
import dataclasses
import math

import numpy as np

from sonichu_jax import preprocess
from sonichu_jax import tasks
from ultrasound_common import errors

SIZE = preprocess.IMAGE_SIZE


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random augmentations (each drawn uniformly, independently per image).

  Attributes:
    flip_p: probability of a horizontal flip.
    no_flip_tasks: tasks never flipped: mirrored cardiac views are not standard views.
    rotation_deg: rotation in [-r, r] degrees.
    scale: isotropic scale range.
    translate: translation in [-t, t] times the image size, per axis.
    max_tries: redraws of the similarity while it would move a visible keypoint outside the image.
    gamma: gamma range (log-uniform).
    contrast: contrast factor range (about the image mean).
    brightness: additive brightness in [-b, b].
    noise_std: Gaussian noise standard deviation in [0, n].
  """
  flip_p: float = 0.5
  no_flip_tasks: tuple[str, ...] = ('PLAX', 'PSAX', 'A4C')
  rotation_deg: float = 15.0
  scale: tuple[float, float] = (0.75, 1.25)
  translate: float = 0.05
  max_tries: int = 10
  gamma: tuple[float, float] = (0.7, 1.4)
  contrast: tuple[float, float] = (0.8, 1.2)
  brightness: float = 0.1
  noise_std: float = 0.03

  def __post_init__(self):
    for name in self.no_flip_tasks:
      tasks.get_task(name)
    if not (0 < self.scale[0] <= self.scale[1] and 0 < self.gamma[0] <= self.gamma[1]
            and self.contrast[0] <= self.contrast[1]):
      raise errors.InputError(
          f'AugmentConfig: ranges must be (low, high) with 0 < low <= high, got scale '
          f'{self.scale}, gamma {self.gamma}, contrast {self.contrast}')


def flip_matrix() -> np.ndarray:
  """x -> SIZE - x in the model frame, as a 3x3 homogeneous matrix."""
  return np.array([[-1.0, 0.0, SIZE], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def similarity_matrix(rotation_deg: float, scale: float, translate_xy: tuple[float, float],
                      image_hw: tuple[int, int]) -> np.ndarray:
  """Rotation and scale about the centre, then translation (fractions of the size), model frame.

  The rotation is one of the original image (H, W): the stretch D = diag(SIZE / W, SIZE / H) to the
  model frame conjugates it, D R D^-1. Positive angles turn x towards y (clockwise on screen).
  """
  h, w = image_hw
  c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
  stretch = np.diag([SIZE / w, SIZE / h])
  linear = scale * stretch @ np.array([[c, -s], [s, c]]) @ np.linalg.inv(stretch)
  centre = np.array([SIZE / 2, SIZE / 2])
  out = np.eye(3)
  out[:2, :2] = linear
  out[:2, 2] = centre + np.asarray(translate_xy) * SIZE - linear @ centre
  return out


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Applies a 3x3 homogeneous affine matrix to (..., 2) points."""
  return points @ matrix[:2, :2].T + matrix[:2, 2]


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """The (S, S) image moved by `matrix` (output point = matrix @ input point); bilinear, zeros."""
  size = image.shape[0]
  centres = np.arange(size, dtype=np.float32) + 0.5
  x, y = np.meshgrid(centres, centres)
  inverse = np.linalg.inv(matrix).astype(np.float32)
  # Index coordinates in the image padded by one zero pixel: continuous c -> c - 0.5 + 1.
  sx = inverse[0, 0] * x + inverse[0, 1] * y + (inverse[0, 2] + 0.5)
  sy = inverse[1, 0] * x + inverse[1, 1] * y + (inverse[1, 2] + 0.5)
  # Clipping to the zero border makes every outside sample 0 without masks.
  j0 = np.clip(np.floor(sx), 0, size).astype(np.int64)
  i0 = np.clip(np.floor(sy), 0, size).astype(np.int64)
  fx, fy = np.clip(sx - j0, 0.0, 1.0), np.clip(sy - i0, 0.0, 1.0)
  flat = np.pad(np.asarray(image, np.float32), 1).ravel()
  top = i0 * (size + 2) + j0
  bottom = top + size + 2
  upper = flat[top] * (1 - fx) + flat[top + 1] * fx
  lower = flat[bottom] * (1 - fx) + flat[bottom + 1] * fx
  return upper * (1 - fy) + lower * fy


def _random_similarity(rng: np.random.Generator, config: AugmentConfig, image_hw: tuple[int, int],
                       points: np.ndarray) -> np.ndarray:
  """A random similarity keeping `points` (model frame) inside the image, or the identity."""
  for _ in range(config.max_tries):
    matrix = similarity_matrix(rng.uniform(-config.rotation_deg, config.rotation_deg),
                               rng.uniform(*config.scale),
                               rng.uniform(-config.translate, config.translate, size=2), image_hw)
    moved = transform_points(matrix, points)
    if np.all((moved >= 0) & (moved <= SIZE)):
      return matrix
  return np.eye(3)


def _intensity(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
  gamma = math.exp(rng.uniform(math.log(config.gamma[0]), math.log(config.gamma[1])))
  image = np.clip(image, 0.0, 1.0) ** gamma
  mean = image.mean()
  image = (image - mean) * rng.uniform(*config.contrast) + mean
  image = image + rng.uniform(-config.brightness, config.brightness)
  image = image + rng.uniform(0.0, config.noise_std) * rng.standard_normal(image.shape)
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def prepare(image: np.ndarray, keypoints: np.ndarray, visible: np.ndarray, task: str,
            rng: np.random.Generator | None = None,
            config: AugmentConfig | None = None) -> dict[str, np.ndarray]:
  """Model input and targets of one image, augmented if `config` is given.

  Args:
    image: (H, W) uint8 grayscale (`fmuia.read_image`).
    keypoints: (K, 2) (x, y) in original pixels.
    visible: (K,) bool.
    task: the task name (flip pairs).
    rng: random generator; required with `config`.
    config: augmentation ranges, or None for none.

  Returns:
    'image' (256, 256, 3) float32 normalised, 'keypoints' (K, 2) float32 normalised (x / W, y / H in
    the possibly augmented image), 'visible' (K,) bool (permuted along with a flip).
  """
  spec = tasks.get_task(task)
  image = np.asarray(image)
  keypoints = np.asarray(keypoints, np.float64)
  visible = np.asarray(visible, bool)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise errors.InputError(
        f'prepare: expected an (H, W) uint8 image, got {image.shape} {image.dtype}')
  if keypoints.shape != (spec.num_keypoints, 2) or visible.shape != (spec.num_keypoints,):
    raise errors.InputError(
        f'prepare: task {task} needs keypoints ({spec.num_keypoints}, 2) and visible '
        f'({spec.num_keypoints},), got {keypoints.shape} and {visible.shape}')
  image_hw = image.shape
  points = preprocess.to_normalised(keypoints, image_hw) * SIZE
  if config is None:
    pixels, _ = preprocess.preprocess(image)
  else:
    if rng is None:
      raise errors.InputError('prepare: augmentation needs an rng')
    # The same stretch as preprocess, on [0, 1] values; augmenting then normalising it (whose
    # resize of a SIZE x SIZE image is the identity) equals preprocess when nothing is drawn.
    gray = preprocess.resize_bilinear(image[..., None] / np.float32(255.0), (SIZE, SIZE))[..., 0]
    matrix = np.eye(3)
    if task not in config.no_flip_tasks and rng.random() < config.flip_p:
      matrix = flip_matrix()
      order = list(spec.flip_permutation())
      points, visible = transform_points(matrix, points)[order], visible[order]
    similarity = _random_similarity(rng, config, image_hw, points[visible])
    points = transform_points(similarity, points)
    pixels, _ = preprocess.preprocess(_intensity(warp(gray, similarity @ matrix), rng, config))
  return dict(image=pixels, keypoints=(points / SIZE).astype(np.float32), visible=visible)
