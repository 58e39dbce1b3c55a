"""Grain input pipelines over registered sweeps for every DualTrack training stage.

Each pipeline returns a `grain.IterDataset` of dict batches of NumPy arrays; its iterator supports
get_state()/set_state() (and grain.checkpoint.CheckpointSave/CheckpointRestore under Orbax). Local
images stay uint8 (cast and /255 in the jitted step); global-encoder images are float32 in [0, 1]
(resizing happens here, as in the original loaders). The stages are those of docs/dualtrack.md,
sections "Training recipes" and "TUS-REC 2025 finetuning".

| pipeline         | stage                        | element                                        |
|------------------|------------------------------|------------------------------------------------|
| `local_windows`  | local encoder L1/L2          | one random K-frame window per sweep per epoch  |
| `global_samples` | global encoder G             | M sorted random frames (with absolute indices) |
| `whole_sweeps`   | fusion, local L3, evaluation | one whole sweep, batch 1                       |
| `frame_pairs`    | 2-frame CNN baseline         | one random frame pair per sweep per epoch      |

Multi-host contract (the trainer relies on it to make N processes equal one): every process builds
the same element stream, source -> shuffle -> repeat -> random_map(read + augment) -> batch with the
per-process batch size b, then keeps batches shard_index::shard_count. random_map seeds each
element's rng from the pipeline seed and the element's index, so process p's batch j is exactly rows
[p*b, (p+1)*b) of the single-process global batch j, and each process reads only its own elements
(MapDataset slicing is lazy).
"""
from collections.abc import Sequence
import dataclasses
import time
from typing import NamedTuple

from absl import logging
import grain
import numpy as np

from dualtrack_jax.data import registry
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms as T
from ultrasound_common import errors

# Global-encoder image sources: the full frame resized (what the released checkpoints see at
# inference), the 50-px border crop resized on the fly (CropAndDownsampleForContextImages), or the
# stored 'images_downsampled-224' (fusion training and 2025 finetuning); docs/dualtrack.md, section
# "Input preprocessing".
GLOBAL_SOURCES = ('resize', 'context', 'downsampled')

# One reading thread per process: h5py serialises all calls on one lock, so parallelism comes from
# worker processes; the thread still overlaps reading with the training step. Two batches ahead
# bounds memory for whole sweeps (a 1500-frame sweep with global images is ~400 MB).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


class SweepRef(NamedTuple):
  """One element of SweepSource: a sweep's position in the records, its id, length and reader."""
  sweep_index: int
  sweep_id: str
  num_frames: int
  reader: sweeps.SweepReader


class SweepSource:
  """Random-access Grain source over registered sweeps; element i is a cheap SweepRef.

  Frame counts and frame sizes are read once here (file metadata and tracking only), then every file
  is closed again, so pickling the source (Grain does, to start worker processes) carries no open
  handle and each process opens its files lazily on first read. Sweeps shorter than `min_frames`
  are skipped (logged), as the original skips sweeps too short for a window.
  """

  def __init__(self, records: Sequence[registry.SweepRecord], *, min_frames: int = 2):
    self._refs = []
    for i, record in enumerate(records):
      reader = sweeps.SweepReader(record.path)
      num_frames, image_shape = reader.num_frames, reader.image_shape  # validates the file
      reader.close()
      if num_frames < min_frames:
        logging.warning('Skipping sweep %s (%s): %d frames < %d needed.', record.sweep_id,
                        record.path, num_frames, min_frames)
        continue
      self._refs.append(SweepRef(i, record.sweep_id, num_frames, reader))
      first = self._refs[0].reader
      if image_shape != first.image_shape:
        raise sweeps.SweepFileError(
            record.path, sweeps.IMAGES, f'frames of size {image_shape} differ from the '
            f'{first.image_shape} of {first.path}; batches need one size')
    if not self._refs:
      raise errors.InputError(
          f'No sweep among the {len(records)} records has >= {min_frames} frames.')

  def __len__(self) -> int:
    return len(self._refs)

  def __getitem__(self, index: int) -> SweepRef:
    return self._refs[index]

  def __repr__(self) -> str:
    return f'SweepSource({[r.reader.path for r in self._refs]})'

  @property
  def image_shape(self) -> tuple[int, int]:
    """(H, W) of the frames of every sweep."""
    return self._refs[0].reader.image_shape

  def require_downsampled(self) -> None:
    """Raises SweepFileError naming the first sweep without 'images_downsampled-224'."""
    for ref in self._refs:
      if not ref.reader.has_downsampled:
        raise sweeps.SweepFileError(ref.reader.path, sweeps.IMAGES_224,
                                    'missing, but global_source="downsampled" was asked for')


def _global_images(item: dict, source: str) -> np.ndarray:
  """Global-encoder images (N, 224, 224) float32 in [0, 1] from the item's augmented frames."""
  if source == 'downsampled':
    return T.to_unit_float(item['global_images'])
  frames = T.to_unit_float(item['images'])
  if source == 'context':
    return T.context_images(frames)
  return T.resize(frames, T.GLOBAL_SIZE)


def _augment(item: dict, rng: np.random.Generator, aug: T.Augmentation | None) -> dict:
  return item if aug is None else T.augment(item, rng, aug)


def _local_crop(item: dict, rng: np.random.Generator, aug: T.Augmentation | None,
                crop_hw: tuple[int, int]) -> dict:
  if aug is not None and aug.random_crop:
    return T.random_crop(item, rng, crop_hw)
  return T.center_crop(item, crop_hw)


@dataclasses.dataclass(frozen=True)
class _ReadWindow(grain.transforms.RandomMap):
  """A random window of `window` frames ('one' subsequence per sweep), augmented and cropped."""
  window: int
  crop_hw: tuple[int, int]
  augment: T.Augmentation | None

  def random_map(self, ref: SweepRef, rng: np.random.Generator) -> dict:
    start = int(rng.integers(0, ref.num_frames - self.window + 1))
    stop = start + self.window
    item = dict(images=ref.reader.images(start, stop), tracking=ref.reader.tracking[start:stop],
                pixel_to_image=ref.reader.pixel_to_image)
    item = _augment(item, rng, self.augment)
    item = T.add_targets(_local_crop(item, rng, self.augment, self.crop_hw))
    return dict(images=np.ascontiguousarray(item['images']), targets=item['targets'],
                targets_global=item['targets_global'], sweep_index=np.int32(ref.sweep_index),
                start=np.int32(start))


@dataclasses.dataclass(frozen=True)
class _ReadPair(grain.transforms.RandomMap):
  """A random frame pair (j, j + 1), or (j, j + 2) with probability `skip_p` (2-frame CNN)."""
  skip_p: float
  crop_hw: tuple[int, int]
  augment: T.Augmentation | None

  def random_map(self, ref: SweepRef, rng: np.random.Generator) -> dict:
    first = int(rng.integers(0, ref.num_frames - 1))
    # As train_2_frame_cnn.py: the skip is drawn for every pair, kept only if j + 2 is a frame.
    skip = rng.random() < self.skip_p and first + 2 < ref.num_frames
    indices = np.array([first, first + 1 + skip])
    item = dict(images=ref.reader.images_at(indices), tracking=ref.reader.tracking[indices],
                pixel_to_image=ref.reader.pixel_to_image)
    item = T.add_targets(_local_crop(_augment(item, rng, self.augment), rng, self.augment,
                                     self.crop_hw))
    return dict(images=np.ascontiguousarray(item['images']), targets=item['targets'],
                pixel_to_image=item['pixel_to_image'].astype(np.float32),
                sweep_index=np.int32(ref.sweep_index), start=np.int32(first))


@dataclasses.dataclass(frozen=True)
class _ReadSamples(grain.transforms.RandomMap):
  """`num_samples` sorted random frames of a sweep (RandomSparseSampleTemporal), global images."""
  num_samples: int
  augment: T.Augmentation | None
  global_source: str

  def random_map(self, ref: SweepRef, rng: np.random.Generator) -> dict:
    indices = np.sort(rng.permutation(ref.num_frames)[:self.num_samples])
    item = dict(tracking=ref.reader.tracking[indices], indices=indices.astype(np.int32))
    if self.global_source == 'downsampled':
      item['global_images'] = ref.reader.downsampled_at(indices)
    else:
      item['images'] = ref.reader.images_at(indices)  # full frames, resized after augmentation
    item = T.add_targets(_augment(item, rng, self.augment))
    return dict(global_images=_global_images(item, self.global_source), indices=item['indices'],
                targets=item['targets'], targets_global=item['targets_global'],
                sweep_index=np.int32(ref.sweep_index))


@dataclasses.dataclass(frozen=True)
class _ReadSweep(grain.transforms.RandomMap):
  """A whole sweep, augmented, with local crops and optionally global images."""
  crop_hw: tuple[int, int]
  augment: T.Augmentation | None
  global_source: str | None

  def random_map(self, ref: SweepRef, rng: np.random.Generator) -> dict:
    n = ref.num_frames
    item = dict(images=ref.reader.images(0, n), tracking=ref.reader.tracking,
                pixel_to_image=ref.reader.pixel_to_image, indices=np.arange(n, dtype=np.int32))
    if self.global_source == 'downsampled':
      item['global_images'] = ref.reader.downsampled_at(np.arange(n))
    item = _augment(item, rng, self.augment)
    global_images = None if self.global_source is None else _global_images(item, self.global_source)
    item = T.add_targets(_local_crop(item, rng, self.augment, self.crop_hw))
    out = dict(images=np.ascontiguousarray(item['images']), targets=item['targets'],
               targets_global=item['targets_global'], tracking=item['tracking'],
               pixel_to_image=item['pixel_to_image'], indices=item['indices'],
               sweep_id=np.array(ref.sweep_id), sweep_index=np.int32(ref.sweep_index))
    if global_images is not None:
      out['global_images'] = global_images
    return out


def _check_global_source(source: SweepSource, global_source: str | None, optional: bool) -> None:
  if global_source is None and optional:
    return
  if global_source not in GLOBAL_SOURCES:
    raise errors.InputError(f'global_source must be one of {GLOBAL_SOURCES}, got {global_source!r}')
  if global_source == 'downsampled':
    source.require_downsampled()
  if global_source == 'context' and min(source.image_shape) <= 2 * T.CONTEXT_BORDER:
    raise errors.InputError(
        f'global_source="context" crops {T.CONTEXT_BORDER} px per side, too much for '
        f'frames of size {source.image_shape}')


def _check_crop(source: SweepSource, crop_hw: tuple[int, int]) -> None:
  h, w = source.image_shape
  if not (0 < crop_hw[0] <= h and 0 < crop_hw[1] <= w):
    raise errors.InputError(f'crop_hw {tuple(crop_hw)} does not fit in the frames of size {(h, w)}')


def _per_process_batch(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise errors.InputError(
        f'The global batch size {batch_size} must be a multiple of the number of '
        f'processes {shard_count}.')
  return batch_size // shard_count


def _pipeline(source: SweepSource, read: grain.transforms.RandomMap, *, seed: int, shuffle: bool,
              num_epochs: int | None, per_process_batch: int, num_workers: int, shard_index: int,
              shard_count: int) -> grain.IterDataset:
  """source -> shuffle -> repeat -> random_map -> batch -> shard slice -> (worker processes).

  Process p takes batches p, p + n, ... of the per-process batches, so its batch j holds rows
  [p*b, (p+1)*b) of the single-process global batch j: row for row what the trainer's global array
  (process-ordered devices) needs for N processes to compute exactly what one does, per-row
  randomness such as dropout included. Slicing a lazy MapDataset reads only this process's batches.
  """
  if not 0 <= shard_index < shard_count:
    raise errors.InputError(f'shard_index {shard_index} outside [0, shard_count={shard_count})')
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs).random_map(read)
  # Always drop an incomplete last batch: a new shape would recompile the step. Batches of one
  # (whole sweeps) lose nothing.
  ds = ds.batch(per_process_batch, drop_remainder=True)[shard_index::shard_count]
  iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_ds


def local_windows(records: Sequence[registry.SweepRecord], *, window: int,
                  crop_hw: tuple[int, int], batch_size: int, seed: int,
                  augment: T.Augmentation | None, shuffle: bool = True,
                  num_epochs: int | None = None, num_workers: int = 0, shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
  """Random K-frame windows for local-encoder pretraining (loader `local_encoder_pretraining`).

  One window per sweep per epoch, start uniform in [0, N - K] (the original's 'one' mode; sweeps
  with fewer than K frames are skipped). With `augment` (e.g. transforms.LOCAL_AUGMENT):
  reverse/flip with their probabilities and a random crop, else a centre crop; the tracking is
  re-expressed in the crop's frame and the targets computed after augmentation.

  Args:
    records: the sweeps (registry.load_sweeps).
    window: K, frames per window.
    crop_hw: (h, w) of the local crops.
    batch_size: GLOBAL batch size; each process gets batch_size // shard_count windows.
    seed: pipeline seed (shuffle, window starts, augmentations).
    augment: augmentation recipe, or None for none (validation).
    shuffle: shuffle the sweeps in every epoch (differently per epoch).
    num_epochs: None repeats forever; with a number, an incomplete last batch is dropped.
    num_workers: worker processes (0: read in this process).
    shard_index, shard_count: this process and the number of processes.

  Returns:
    IterDataset of dicts: 'images' (B,K,h,w) uint8, 'targets' (B,K-1,6) float32 relative pose
    vectors, 'targets_global' (B,K-1,6) float32 poses of frames 1.. relative to frame 0,
    'sweep_index' (B,) int32 (position in `records`), 'start' (B,) int32 first frame.
  """
  source = SweepSource(records, min_frames=window)
  _check_crop(source, crop_hw)
  return _pipeline(source, _ReadWindow(window, tuple(crop_hw), augment), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs,
                   per_process_batch=_per_process_batch(batch_size, shard_count),
                   num_workers=num_workers, shard_index=shard_index, shard_count=shard_count)


def frame_pairs(records: Sequence[registry.SweepRecord], *, crop_hw: tuple[int, int],
                batch_size: int, seed: int, augment: T.Augmentation | None, skip_p: float = 0.0,
                shuffle: bool = True, num_epochs: int | None = None, num_workers: int = 0,
                shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Random frame pairs for the 2-frame CNN baseline (train_2_frame_cnn.py, "tus_rec" mode).

  One pair per sweep per epoch: frames j and j + 1 with j uniform in [0, N - 2], or j and j + 2
  with probability `skip_p` (its `skip_frame_prob`); then the augmentations and crop of
  `local_windows`. Arguments as `local_windows`.

  Returns:
    IterDataset of dicts: 'images' (B,2,h,w) uint8, 'targets' (B,1,6) float32 pose vector of the
    second frame relative to the first, 'pixel_to_image' (B,4,4) float32 of the crop frame (the
    challenge's point loss), 'sweep_index' (B,) int32, 'start' (B,) int32 (j).
  """
  source = SweepSource(records)
  _check_crop(source, crop_hw)
  return _pipeline(source, _ReadPair(float(skip_p), tuple(crop_hw), augment), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs,
                   per_process_batch=_per_process_batch(batch_size, shard_count),
                   num_workers=num_workers, shard_index=shard_index, shard_count=shard_count)


def global_samples(records: Sequence[registry.SweepRecord], *, num_samples: int, batch_size: int,
                   seed: int, augment: T.Augmentation | None, global_source: str = 'resize',
                   shuffle: bool = True, num_epochs: int | None = None, num_workers: int = 0,
                   shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Sparse sorted random frames for global-encoder pretraining (`global_encoder_pretraining`).

  Each element is one sweep: M = num_samples distinct frames drawn uniformly and sorted (the
  original's RandomSparseSampleTemporal, 64 frames; sweeps with fewer frames are skipped), with
  their absolute indices for the position embedding, targets between consecutive sampled frames
  (pred_mode="local"). With `augment` (e.g. transforms.GLOBAL_AUGMENT) flip/reverse; reversal
  keeps 'indices' ascending, as the original. Arguments as `local_windows`, plus `global_source`
  (one of GLOBAL_SOURCES; the original pretraining resized full frames).

  Returns:
    IterDataset of dicts: 'global_images' (B,M,224,224) float32 in [0, 1], 'indices' (B,M) int32,
    'targets' (B,M-1,6) float32, 'targets_global' (B,M-1,6) float32, 'sweep_index' (B,) int32.
  """
  source = SweepSource(records, min_frames=num_samples)
  _check_global_source(source, global_source, optional=False)
  return _pipeline(source, _ReadSamples(num_samples, augment, global_source), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs,
                   per_process_batch=_per_process_batch(batch_size, shard_count),
                   num_workers=num_workers, shard_index=shard_index, shard_count=shard_count)


def whole_sweeps(records: Sequence[registry.SweepRecord], *, crop_hw: tuple[int, int], seed: int,
                 augment: T.Augmentation | None, shuffle: bool, num_epochs: int | None = None,
                 global_source: str | None = None, num_workers: int = 0, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
  """Whole sweeps, batch 1, for fusion training, local stage 3 and evaluation.

  Evaluation: augment=None (centre crop), shuffle=False, num_epochs=1 (each process then gets
  sweeps shard_index::shard_count; the last batch is kept). 2025 finetuning:
  augment=transforms.FUSION_2025_AUGMENT (reverse, 90 % subsampling, flip, random crop).

  Returns:
    IterDataset of dicts with a leading batch axis of 1: 'images' (1,N,h,w) uint8 local crops,
    'targets' (1,N-1,6) and 'targets_global' (1,N-1,6) float32, 'tracking' (1,N,4,4) float64 and
    'pixel_to_image' (1,4,4) float64 of the crop frame (for the metrics), 'indices' (1,N) int32
    frame positions, 'sweep_id' (1,) str (drop it before device_put), 'sweep_index' (1,) int32,
    and with `global_source` 'global_images' (1,N,224,224) float32 in [0, 1].
  """
  source = SweepSource(records)
  _check_crop(source, crop_hw)
  _check_global_source(source, global_source, optional=True)
  return _pipeline(source, _ReadSweep(tuple(crop_hw), augment, global_source), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs, per_process_batch=1,
                   num_workers=num_workers, shard_index=shard_index, shard_count=shard_count)


def measure_throughput(ds: grain.IterDataset, *, num_batches: int, warmup: int = 2) -> dict:
  """Times `num_batches` batches after `warmup` ones (worker start-up excluded).

  Returns {'batches_per_s', 'elements_per_s', 'seconds'}; elements are counted along the leading
  batch axis of the first array.
  """
  it = iter(ds)
  try:
    for _ in range(warmup):
      next(it)
    elements, start = 0, time.perf_counter()
    for _ in range(num_batches):
      batch = next(it)
      elements += len(next(iter(batch.values())))
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return dict(batches_per_s=num_batches / seconds, elements_per_s=elements / seconds,
              seconds=seconds)
