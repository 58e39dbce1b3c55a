"""I-JEPA multi-block masks on the patch grid, in NumPy, with fixed (padded) token counts.

One context block and M target blocks per image (`src/masks/multiblock.py::MaskCollator` of
facebookresearch/ijepa, commit 52c1ae9). A block's size comes from ONE uniform draw u that sets both
its scale s and its aspect ratio r (the original's coupling): keep = int(N s), h = round(sqrt(keep
r)), w = round(sqrt(keep / r)); its top-left corner is uniform. The context block loses every patch
of the target blocks (allow_overlap False); a context with min_keep patches or fewer is drawn again,
and after every 20 failures one more target block (the last ones first) stops constraining it, as
the original does.

Two modes (`MaskConfig.official`):
- official=True reproduces the original collator exactly: the block sizes are drawn once per batch
  (shared by every image and every target block), h and w are clipped to grid - 1, corners are
  drawn with randint(0, grid - h) whose upper end is exclusive, so no block ever covers the last
  patch row or column (on 16x16 the context block is always the top-left 15x15), and every image's
  index lists are truncated to the shortest of the batch, which drops trailing (bottom-right)
  patches. Use `sample_batch`.
- official=False (default) draws sizes and positions per example, lets blocks reach every row and
  column (h, w <= grid, corners in [0, grid - h]) and truncates nothing (or only beyond
  `max_context`), so a mask depends on its example alone. Use `sample_example`.

Both return index lists padded to sizes fixed by the config (`token_counts`), with validity masks,
so the train step compiles once; the model masks attention and loss with them. The keys:

| key             | shape, dtype      | meaning                                           |
|-----------------|-------------------|---------------------------------------------------|
| `context_index` | (Kc,) int32       | ascending flat patch indices (row-major), 0-padded |
| `context_valid` | (Kc,) bool        | False for padding                                 |
| `target_index`  | (M, Kt) int32     | per target block, ascending flat indices          |
| `target_valid`  | (M, Kt) bool      | False for padding                                 |
"""
from collections.abc import Sequence
import dataclasses
import functools
import math

import numpy as np

from ultrasound_common import errors

# The original retries a too-small context this many times before relaxing one constraint.
_TIMEOUT = 20


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Block geometry (defaults: every I-JEPA config) and the mode; see the module docstring.

  Attributes:
    grid: (rows, cols) of the patch grid, e.g. (16, 16) for 256 px and 16 px patches.
    num_targets: M, target blocks per image.
    target_scale: range of the fraction of the grid a target block covers.
    target_aspect: range of a target block's h / w.
    context_scale: range of the context block's fraction.
    context_aspect: range of the context block's h / w (1 in I-JEPA).
    min_keep: a context block must keep MORE than this many patches (the original's `>`).
    allow_overlap: keep the target patches in the context (False in I-JEPA).
    official: reproduce the original collator exactly (module docstring).
    max_context: 0, or the padded context length: longer per-example lists drop their trailing
      indices, as the original's truncation does (a cheaper context encoder).
  """
  grid: tuple[int, int] = (16, 16)
  num_targets: int = 4
  target_scale: tuple[float, float] = (0.15, 0.2)
  target_aspect: tuple[float, float] = (0.75, 1.5)
  context_scale: tuple[float, float] = (0.85, 1.0)
  context_aspect: tuple[float, float] = (1.0, 1.0)
  min_keep: int = 10
  allow_overlap: bool = False
  official: bool = False
  max_context: int = 0

  def __post_init__(self):
    gh, gw = self.grid
    if gh < 2 or gw < 2:
      raise errors.InputError(f'MaskConfig.grid must be at least 2x2, got {self.grid}')
    if self.num_targets < 1:
      raise errors.InputError(f'MaskConfig.num_targets must be >= 1, got {self.num_targets}')
    for name in ('target_scale', 'target_aspect', 'context_scale', 'context_aspect'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise errors.InputError(f'MaskConfig.{name} must be 0 < lo <= hi, got {(lo, hi)}')
    if self.min_keep >= gh * gw:
      raise errors.InputError(f'MaskConfig.min_keep={self.min_keep} leaves no valid context on '
                              f'a {gh}x{gw} grid')


def block_size(u: float, scale: Sequence[float], aspect: Sequence[float], grid: tuple[int, int],
               official: bool) -> tuple[int, int]:
  """(h, w) of a block from the uniform draw u (the original's `_sample_block_size`)."""
  gh, gw = grid
  s = scale[0] + u * (scale[1] - scale[0])
  keep = int(gh * gw * s)
  r = aspect[0] + u * (aspect[1] - aspect[0])
  h, w = int(round(math.sqrt(keep * r))), int(round(math.sqrt(keep / r)))
  # The original clips to grid - 1 (`while h >= height`), so that randint(0, grid - h) is defined.
  limit = (gh - 1, gw - 1) if official else (gh, gw)
  return max(1, min(h, limit[0])), max(1, min(w, limit[1]))


def _max_area(scale, aspect, grid, official) -> int:
  """The largest h * w that `block_size` gives over u in [0, 1] (a fine sweep plus the ends)."""
  return max(h * w for h, w in (block_size(u, scale, aspect, grid, official)
                                for u in np.linspace(0.0, 1.0, 10001)))


@functools.cache
def token_counts(config: MaskConfig) -> tuple[int, int]:
  """(Kc, Kt): the padded context length and the padded length of each target block."""
  kt = _max_area(config.target_scale, config.target_aspect, config.grid, config.official)
  kc = _max_area(config.context_scale, config.context_aspect, config.grid, config.official)
  if config.max_context:
    kc = min(kc, config.max_context)
  return kc, kt


def _block(rng: np.random.Generator, size: tuple[int, int], grid: tuple[int, int],
           official: bool) -> np.ndarray:
  """A (gh, gw) bool mask of one block of `size` at a uniform top-left corner."""
  (h, w), (gh, gw) = size, grid
  # The original's exclusive randint(0, grid - h) never reaches the last row or column.
  extra = 0 if official else 1
  top = rng.integers(0, gh - h + extra)
  left = rng.integers(0, gw - w + extra)
  mask = np.zeros(grid, bool)
  mask[top:top + h, left:left + w] = True
  return mask


def _context(rng: np.random.Generator, size, targets: Sequence[np.ndarray],
             config: MaskConfig) -> np.ndarray:
  """Flat indices of the context block minus the targets (the original's retry rule)."""
  tries, timeout = 0, _TIMEOUT
  while True:
    mask = _block(rng, size, config.grid, config.official)
    if not config.allow_overlap:
      for target in targets[:max(len(targets) - tries, 0)]:
        mask &= ~target
    index = np.flatnonzero(mask)
    if len(index) > config.min_keep:
      return index
    timeout -= 1
    if timeout == 0:
      tries, timeout = tries + 1, _TIMEOUT


def _image_masks(rng: np.random.Generator, target_size, context_size, config: MaskConfig):
  """(context indices, [target indices] * M) of one image, in the original's draw order."""
  targets = [_block(rng, target_size, config.grid, config.official)
             for _ in range(config.num_targets)]
  context = _context(rng, context_size, targets, config)
  return context, [np.flatnonzero(t) for t in targets]


def _sizes(rng: np.random.Generator, config: MaskConfig):
  """Target and context block sizes, from two uniform draws in the original's order."""
  target = block_size(rng.random(), config.target_scale, config.target_aspect, config.grid,
                      config.official)
  context = block_size(rng.random(), config.context_scale, config.context_aspect, config.grid,
                       config.official)
  return target, context


def _pad(index: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  index = index[:length]
  out = np.zeros(length, np.int32)
  out[:len(index)] = index
  return out, np.arange(length) < len(index)


def _pack(context: np.ndarray, targets: Sequence[np.ndarray], config: MaskConfig
          ) -> dict[str, np.ndarray]:
  kc, kt = token_counts(config)
  context_index, context_valid = _pad(context, kc)
  padded = [_pad(t, kt) for t in targets]
  return dict(context_index=context_index, context_valid=context_valid,
              target_index=np.stack([p[0] for p in padded]),
              target_valid=np.stack([p[1] for p in padded]))


def sample_example(rng: np.random.Generator, config: MaskConfig) -> dict[str, np.ndarray]:
  """The masks of one image, per example (official=False); keys in the module docstring."""
  if config.official:
    raise errors.InputError('sample_example: MaskConfig.official draws sizes per batch; use '
                            'sample_batch')
  context, targets = _image_masks(rng, *_sizes(rng, config), config)
  return _pack(context, targets, config)


def sample_batch(rng: np.random.Generator, batch_size: int, config: MaskConfig
                 ) -> dict[str, np.ndarray]:
  """The masks of a batch, stacked on a leading axis.

  official=True: the original collator (one size draw per batch, lists truncated to the batch's
  shortest, then padded to the fixed counts so only the validity masks vary); else independent
  per-example masks from the same generator.
  """
  if not config.official:
    return {k: np.stack(v) for k, v in zip(
        ('context_index', 'context_valid', 'target_index', 'target_valid'),
        zip(*[sample_example(rng, config).values() for _ in range(batch_size)]))}
  target_size, context_size = _sizes(rng, config)
  images = [_image_masks(rng, target_size, context_size, config) for _ in range(batch_size)]
  keep_context = min(len(c) for c, _ in images)
  keep_target = min(len(t) for _, ts in images for t in ts)
  packed = [_pack(c[:keep_context], [t[:keep_target] for t in ts], config) for c, ts in images]
  return {k: np.stack([p[k] for p in packed]) for k in packed[0]}
