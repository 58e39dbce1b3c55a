"""Grain pipelines for I-JEPA pretraining: image crops plus their multi-block masks.

Images come from a pool of (H, W) uint8 grayscale arrays: `synthetic_pool` (the built-in synthetic
ultrasound scenes of all nine tasks, in memory) or `folder_images` (every image file under a
folder's `train/` or `val/`, read when used; an FM_UIA data folder is one, its labels unused). A
training example is I-JEPA's augmentation, a
RandomResizedCrop(scale (0.3, 1.0), ratio (3/4, 4/3)) resized to `image_size` (bilinear, no
antialiasing, as sonichu_jax.preprocess), replicated to 3 channels and ImageNet-normalised, plus
its masks (`sonichu_jax.data.ijepa_masks`; keys in that module's docstring):

| key     | shape, dtype                | meaning               |
|---------|-----------------------------|-----------------------|
| `image` | (b, size, size, 3) float32  | normalised crop       |
| masks   | see ijepa_masks             | context/target blocks |

Example i of the endless stream reads image perm_e[i mod n] (a fresh permutation per pass e) and
draws its crop and (per-example mode) its masks from generators seeded by (seed, i): the stream is a
function of (seed, i), so the iterator state is a position and resumes exactly. In the official
mask mode the masks are drawn per per-process batch (the original collator runs per GPU), from a
generator seeded by (seed, process, batch index).

Multi-host contract (as sonichu_jax.data.pipeline): each process batches by b = B / processes and
takes every processes-th batch from its own index, so N processes read exactly the rows of one
(the per-example masks too; the official per-batch masks are per process by design).
"""
from collections.abc import Sequence
import functools
import math
import os

import grain
import numpy as np

from sonichu_jax import preprocess
from sonichu_jax import tasks
from sonichu_jax.data import ijepa_masks
from sonichu_jax.data import synthetic
from ultrasound_common import errors

_ENDLESS = 1 << 40
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class ImageFiles(Sequence):
  """Image files read on access as (H, W) uint8 grayscale (`preprocess.read_gray`)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = tuple(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> np.ndarray:
    return preprocess.read_gray(self.paths[i])


def folder_images(folder: str, split: str, *, limit: int = 0, seed: int = 0) -> ImageFiles:
  """The image files under `folder`/`split` (recursively, sorted); `limit` > 0 keeps that many,
  chosen with `seed` (kept in path order)."""
  root = os.path.join(os.path.expanduser(folder), split)
  if not os.path.isdir(root):
    raise errors.InputError(f'config.data.dataset={folder!r}: no {split}/ folder ({root})')
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    raise errors.InputError(f'config.data.dataset={folder!r}: no image files '
                            f'({", ".join(IMAGE_SUFFIXES)}) under {root}')
  if 0 < limit < len(paths):
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), limit, replace=False))
    paths = [paths[i] for i in keep]
  return ImageFiles(paths)


def synthetic_pool(num: int, *, seed: int, split: str,
                   image_hw: tuple[int, int] = (128, 160)) -> list[np.ndarray]:
  """`num` synthetic images cycling over the nine tasks (image i: task i mod 9)."""
  config = synthetic.SyntheticConfig(image_hw=tuple(image_hw))
  names = tasks.TASK_NAMES
  return [synthetic.generate(names[i % len(names)],
                             synthetic.sample_seed(seed, split, names[i % len(names)],
                                                   i // len(names)), config)['image']
          for i in range(num)]


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, size: int,
                        scale: Sequence[float] = (0.3, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop), then a resize.

  Returns:
    (size, size) float32 in [0, 1].
  """
  h, w = image.shape
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  crop = image[top:top + ch, left:left + cw, None].astype(np.float32) / 255.0
  return preprocess.resize_bilinear(crop, (size, size))[..., 0]


def normalise(grey: np.ndarray) -> np.ndarray:
  """(H, W) in [0, 1] -> (H, W, 3) ImageNet-normalised float32."""
  rgb = np.broadcast_to(grey[..., None], (*grey.shape, 3))
  return ((rgb - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, 0, epoch)).permutation(n)


class _Example(grain.transforms.Map):
  """Stream position i -> one augmented crop and, in per-example mode, its masks."""

  def __init__(self, images, seed, image_size, crop_scale, mask_config):
    self.images, self.seed, self.image_size = images, seed, image_size
    self.crop_scale, self.mask_config = tuple(crop_scale), mask_config

  def map(self, i: int) -> dict[str, np.ndarray]:
    n = len(self.images)
    image = self.images[_permutation(self.seed, i // n, n)[i % n]]
    crop = random_resized_crop(np.random.default_rng((self.seed, 1, i)), image, self.image_size,
                               self.crop_scale)
    out = {'image': normalise(crop)}
    if not self.mask_config.official:
      out.update(ijepa_masks.sample_example(np.random.default_rng((self.seed, 2, i)),
                                            self.mask_config))
    return out


class _BatchMasks(grain.transforms.MapWithIndex):
  """Official mode: the original collator's masks for a whole per-process batch."""

  def __init__(self, seed, shard_index, mask_config):
    self.seed, self.shard_index, self.mask_config = seed, shard_index, mask_config

  def map_with_index(self, j: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, 3, self.shard_index, j))
    return {**batch, **ijepa_masks.sample_batch(rng, len(batch['image']), self.mask_config)}


def check_grid(image_size: int, patch_size: int, mask_config: ijepa_masks.MaskConfig) -> None:
  """The mask grid must be the model's token grid."""
  grid = (image_size // patch_size,) * 2
  if image_size % patch_size or tuple(mask_config.grid) != grid:
    raise errors.InputError(f'I-JEPA masks: grid {tuple(mask_config.grid)} does not match '
                            f'{image_size} px images with {patch_size} px patches ({grid})')


def train_batches(images: Sequence[np.ndarray], *, batch_size: int, seed: int, image_size: int,
                  mask_config: ijepa_masks.MaskConfig,
                  crop_scale: Sequence[float] = (0.3, 1.0), shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
  """Endless per-process batches of b = batch_size // shard_count crops with their masks."""
  if not images:
    raise errors.InputError('I-JEPA pretraining: the image pool is empty')
  if batch_size <= 0 or batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise errors.InputError(f'I-JEPA pretraining: batch size {batch_size} must be a positive '
                            f'multiple of the {shard_count} processes (shard {shard_index})')
  b = batch_size // shard_count
  ds = grain.MapDataset.range(_ENDLESS).map(
      _Example(images, seed, image_size, crop_scale, mask_config))
  ds = ds.batch(b, drop_remainder=True)[shard_index::shard_count]
  if mask_config.official:
    ds = ds.map_with_index(_BatchMasks(seed, shard_index, mask_config))
  return ds.to_iter_dataset(_READ_OPTIONS)


def eval_batch(images: Sequence[np.ndarray], *, image_size: int,
               mask_config: ijepa_masks.MaskConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Every image whole (resized, no crop) with fixed masks drawn from `seed`: one batch."""
  batch = {'image': np.stack([normalise(preprocess.resize_bilinear(
      image[..., None].astype(np.float32) / 255.0, (image_size, image_size))[..., 0])
                              for image in images])}
  batch.update(ijepa_masks.sample_batch(np.random.default_rng((seed, 4)), len(images),
                                        mask_config))
  return batch
