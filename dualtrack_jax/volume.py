"""Freehand 3D ultrasound volume reconstruction: frames placed by their poses, compounded on a grid.

Forward-mapping compounding (Rohling et al., "A comparison of freehand three-dimensional
ultrasound reconstruction techniques", Med. Image Anal. 1999; Solberg et al., "Freehand 3D
ultrasound reconstruction algorithms - a review", UMB 2007): every pixel of every frame is mapped
into the reference frame by its frame's transform and its value is accumulated into the voxel grid
with a weight, `sum(w * value) / sum(w)` per voxel afterwards.

- 'pnn' (pixel nearest neighbour): each pixel adds weight 1 to its nearest voxel; a voxel hit by
  several pixels gets their mean. Holes (voxels no pixel falls into, e.g. between frames further
  apart than the voxel size) stay empty: weight 0, value 0; no hole-filling pass.
- 'trilinear' (splatting): each pixel adds to its 8 neighbouring voxels with trilinear weights;
  smoother and with fewer holes, about 6x the time.

Coordinates: `global_transforms[i]` maps frame-i image coordinates (mm, DualTrack's centred frame:
x lateral along the width, y axial down the rows, z = x cross y) to the reference frame (frame 0 for
DualTrack's globals `G_i`, or the tracker's world for raw `tracking`), and `pixel_to_image` maps a
0-based pixel (column, row, 0, 1) to image mm (the h5 sweep field). The grid is axis-aligned in the
reference frame: voxel (i, j, k) is centred at `origin + (i, j, k) * spacing` (mm), and volumes are
indexed (X, Y, Z).

Memory is bounded: frames are read and placed a chunk at a time (about 0.5M pixels), so a sweep of
thousands of 480x640 frames never has its pixel positions in memory at once, and `frames` may be an
h5py dataset that is read chunk by chunk. Accumulation is `np.add.at` into float32 sums, chosen by
measurement on the project's CPU: with matching float32 dtypes NumPy >= 2 takes its unbuffered
`ufunc.at` fast path, 3-10 ns per pixel (1M pixels into a 26M-voxel grid: 3 ms for a slab-shaped
chunk, 10 ms for random voxels), against 17 ms for `np.bincount` (which allocates a whole-grid
float64 result per call), 18 ms for a jitted JAX scatter-add and 53 ms for `jax.ops.segment_sum` on
CPU (plus the host-device copies). It also adds in pixel order, so chunked and unchunked
reconstructions are bit-identical. Whole sweeps of 480x640 frames at 0.5 mm: 11 ms per frame
('pnn') and 67 ms per frame ('trilinear') on one busy core of that CPU.

Writers: NIfTI-1 (`.nii`, `.nii.gz`, through nibabel) with the grid's spacing and origin in its
qform and sform, and h5 ('volume', 'mask', 'spacing', 'origin'). `slices_figure` draws three
orthogonal mid-slices.
"""
from collections.abc import Sequence
import dataclasses
import os

import h5py
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import nibabel
import numpy as np

from ultrasound_common import errors

DEFAULT_MAX_VOXELS = 512 ** 3
METHODS = ('pnn', 'trilinear')
# Pixels placed per chunk (one 480x640 frame): bounds the temporaries (trilinear: ~70 MB).
_PIXELS_PER_CHUNK = 1 << 19

# The voxel types the NIfTI writer takes: the float32 volume and the uint8 mask.
_NIFTI_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class Grid:
  """An axis-aligned voxel grid: voxel (i, j, k) is centred at origin + (i, j, k) * spacing (mm)."""
  shape: tuple[int, int, int]
  origin: np.ndarray
  spacing: np.ndarray

  @property
  def num_voxels(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def affine(self) -> np.ndarray:
    """(4, 4) voxel index (i, j, k, 1) -> reference-frame mm."""
    m = np.diag([*self.spacing, 1.0])
    m[:3, 3] = self.origin
    return m


@dataclasses.dataclass(frozen=True)
class Volume:
  """A reconstruction: `data` (X, Y, Z) float32 weighted means (0 where empty) and their weights."""
  data: np.ndarray
  weight: np.ndarray
  grid: Grid

  @property
  def mask(self) -> np.ndarray:
    """(X, Y, Z) bool: voxels that received at least one pixel."""
    return self.weight > 0


def _spacing3(spacing) -> np.ndarray:
  s = np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy()
  if not (np.all(np.isfinite(s)) and np.all(s > 0)):
    raise errors.InputError(
        f'dualtrack_jax.volume: spacing must be positive (mm, one or three values), '
        f'got {np.asarray(spacing).tolist()}')
  return s


def _checked_transforms(global_transforms, pixel_to_image):
  g = np.asarray(global_transforms, np.float64)
  p = np.asarray(pixel_to_image, np.float64)
  if g.ndim != 3 or g.shape[1:] != (4, 4) or not len(g):
    raise errors.InputError(
        f'dualtrack_jax.volume: global_transforms must be (N, 4, 4), got shape {g.shape}')
  if not np.all(np.isfinite(g)):
    bad = int(np.flatnonzero(~np.isfinite(g).all(axis=(1, 2)))[0])
    raise errors.InputError(f'dualtrack_jax.volume: global_transforms[{bad}] is not finite')
  if p.shape != (4, 4) or not np.all(np.isfinite(p)):
    raise errors.InputError(
        f'dualtrack_jax.volume: pixel_to_image must be a finite (4, 4) matrix, got '
        f'shape {p.shape}')
  return g, p


def frame_corners(global_transforms, pixel_to_image, image_shape: tuple[int, int]) -> np.ndarray:
  """(N, 4, 3) reference-frame positions (mm) of the centres of every frame's 4 corner pixels."""
  g, p = _checked_transforms(global_transforms, pixel_to_image)
  h, w = image_shape
  corners = np.array([[0, 0, 0, 1], [w - 1, 0, 0, 1], [0, h - 1, 0, 1], [w - 1, h - 1, 0, 1]],
                     np.float64).T
  return np.einsum('nij,jk->nki', g @ p, corners)[..., :3]


def bounding_grid(global_transforms, pixel_to_image, image_shape: tuple[int, int], spacing, *,
                  bounds: Sequence[Sequence[float]] | None = None,
                  max_voxels: int = DEFAULT_MAX_VOXELS) -> Grid:
  """The grid of `spacing` over the axis-aligned bounding box of all frames (or over `bounds`).

  Args:
    global_transforms: (N, 4, 4) frame image mm -> reference mm.
    pixel_to_image: (4, 4) 0-based pixel -> image mm.
    image_shape: (H, W) of the frames.
    spacing: voxel size in mm, one value or (sx, sy, sz).
    bounds: optional ((xmin, ymin, zmin), (xmax, ymax, zmax)) mm to reconstruct only that box.
    max_voxels: refuse grids with more voxels than this (each costs 8 bytes while compounding).

  The first voxel is centred on the box's low corner and the grid reaches at least half a voxel
  beyond its high corner, so every pixel's nearest voxel is inside.
  """
  spacing = _spacing3(spacing)
  if bounds is None:
    corners = frame_corners(global_transforms, pixel_to_image, image_shape).reshape(-1, 3)
    low, high = corners.min(axis=0), corners.max(axis=0)
  else:
    box = np.asarray(bounds, np.float64)
    if box.shape != (2, 3) or not np.all(np.isfinite(box)) or not np.all(box[1] >= box[0]):
      raise errors.InputError(
          f'dualtrack_jax.volume: bounds must be ((xmin, ymin, zmin), (xmax, ymax, '
          f'zmax)) with max >= min, got {np.asarray(bounds).tolist()}')
    low, high = box
  shape = tuple(int(n) for n in np.floor((high - low) / spacing + 0.5).astype(np.int64) + 1)
  grid = Grid(shape=shape, origin=low, spacing=spacing)
  if grid.num_voxels > max_voxels:
    extent = high - low
    # The isotropic spacing whose grid fits, rounded up to 0.01 mm.
    fits = np.ceil(np.cbrt(np.prod(extent + spacing) / max_voxels) * 100) / 100
    raise errors.InputError(
        f'dualtrack_jax.volume: spacing {spacing.tolist()} mm over a box of '
        f'{np.round(extent, 1).tolist()} mm gives a {"x".join(map(str, shape))} grid '
        f'({grid.num_voxels:,} voxels) > max_voxels={max_voxels:,}; use a spacing of about '
        f'{fits:g} mm or more, crop with bounds, or raise max_voxels')
  return grid


def _accumulate(total: np.ndarray, weight: np.ndarray, grid: Grid, to_voxel: np.ndarray,
                values: np.ndarray, method: str) -> None:
  """Adds frames `values` (F, H, W) float32, placed by `to_voxel` (F, 4, 4) pixel -> voxel."""
  _, h, w = values.shape
  cols = np.arange(w, dtype=np.float32)
  rows = np.arange(h, dtype=np.float32)[:, None]
  m = to_voxel.astype(np.float32)
  # Continuous voxel coordinates of every pixel: m[:, a] @ (col, row, 0, 1), separably.
  coords = [(m[:, a, 0, None, None] * cols + m[:, a, 1, None, None] * rows
             + m[:, a, 3, None, None]).ravel() for a in range(3)]
  values = values.ravel()
  # int32 indices are ~5x faster to make than int64; the default voxel limit is far below 2^31.
  index_dtype = np.int32 if grid.num_voxels < 2 ** 31 else np.int64
  shape = np.asarray(grid.shape, index_dtype)
  strides = np.array([shape[1] * shape[2], shape[2], 1], index_dtype)
  if method == 'pnn':
    # Tested on the floats, before the integer cast can overflow for far-away pixels.
    inside = np.ones(values.shape, bool)
    for a in range(3):
      inside &= (coords[a] >= -0.5) & (coords[a] < shape[a] - 0.5)
    flat = sum(np.rint(coords[a][inside]).astype(index_dtype) * strides[a] for a in range(3))
    np.add.at(total, flat, values[inside])
    np.add.at(weight, flat, np.float32(1))
    return
  # Trilinear splat: pixels whose 8 neighbours are all outside are dropped first.
  near = np.ones(values.shape, bool)
  for a in range(3):
    near &= (coords[a] > -1) & (coords[a] < shape[a])
  values = values[near, None]
  # (P, 8) neighbours, pixel-major: the additions come in pixel order whatever the chunking.
  offsets = np.array(list(np.ndindex(2, 2, 2)))
  w_corner = np.ones((len(values), 8), np.float32)
  inside = np.ones((len(values), 8), bool)
  flat = np.zeros((len(values), 8), index_dtype)
  for a in range(3):
    c = coords[a][near]
    low = np.floor(c)
    frac = (c - low)[:, None]
    i = low.astype(index_dtype)[:, None] + offsets[:, a].astype(index_dtype)
    inside &= (i >= 0) & (i < shape[a])
    w_corner *= np.where(offsets[:, a] == 1, frac, 1 - frac)
    flat += i * strides[a]
  np.add.at(total, flat[inside], (w_corner * values)[inside])
  np.add.at(weight, flat[inside], w_corner[inside])


def reconstruct(frames, global_transforms, pixel_to_image, spacing=0.5, *, method: str = 'pnn',
                grid: Grid | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
                frames_per_chunk: int | None = None) -> Volume:
  """Compounds a sweep's frames into a voxel grid by their transforms.

  Args:
    frames: (N, H, W) intensities (uint8 or float), or anything with `.shape` and slicing along
      the first axis (an h5py dataset, a memmap): read `frames_per_chunk` frames at a time.
    global_transforms: (N, 4, 4) frame-i image mm -> reference mm (e.g. DualTrack's globals).
    pixel_to_image: (4, 4) 0-based pixel (column, row, 0, 1) -> image mm.
    spacing: voxel size in mm (one value or three); ignored when `grid` is given.
    method: 'pnn' (nearest voxel) or 'trilinear' (splat to the 8 neighbours).
    grid: the voxel grid; default `bounding_grid(...)` over all frames.
    max_voxels: the voxel limit of the default grid (see `bounding_grid`).
    frames_per_chunk: frames placed together; default about 0.5M pixels (one 480x640 frame).

  Returns:
    Volume: (X, Y, Z) float32 mean intensities (0 where no pixel landed), the summed weights
    (pixel counts for 'pnn') and the grid.
  """
  if method not in METHODS:
    raise errors.InputError(
        f'dualtrack_jax.volume: method must be one of {METHODS}, got {method!r}')
  g, p = _checked_transforms(global_transforms, pixel_to_image)
  shape = tuple(getattr(frames, 'shape', ()))
  if len(shape) != 3 or shape[0] != len(g):
    raise errors.InputError(f'dualtrack_jax.volume: frames must be (N, H, W) with N = {len(g)} '
                            f'transforms, got shape {shape}')
  n, h, w = shape
  if grid is None:
    grid = bounding_grid(g, p, (h, w), spacing, max_voxels=max_voxels)
  # Pixel -> continuous voxel index: inv(affine) @ G_i @ pixel_to_image, composed in float64.
  to_voxel = np.linalg.inv(grid.affine) @ g @ p
  total = np.zeros(grid.shape, np.float32).reshape(-1)
  weight = np.zeros(grid.shape, np.float32).reshape(-1)
  chunk = max(1, frames_per_chunk or _PIXELS_PER_CHUNK // (h * w))
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    values = np.asarray(frames[start:stop], dtype=np.float32)
    _accumulate(total, weight, grid, to_voxel[start:stop], values, method)
  np.divide(total, weight, out=total, where=weight > 0)
  return Volume(data=total.reshape(grid.shape), weight=weight.reshape(grid.shape), grid=grid)


def write_nifti(path: str | os.PathLike, array: np.ndarray, grid: Grid, *,
                description: str = '') -> None:
  """Writes an (X, Y, Z) uint8 or float32 array on `grid` as NIfTI-1 (gzipped if path ends .gz).

  The qform and sform both map voxel (i, j, k) to `grid.origin + (i, j, k) * grid.spacing` mm
  (codes 1, 'scanner'; the qform's quaternion is the identity with qfac +1, its pixdim the
  spacing); units mm; the data unscaled (slope 1, intercept 0) in the array's own type.
  `description` goes into the header's 80-byte `descrip` (ASCII, cut to 79 characters). Viewers
  read the reference frame's x, y, z as their x, y, z.
  """
  path = os.fspath(path)
  array = np.asarray(array)
  if array.dtype not in _NIFTI_DTYPES:
    raise errors.InputError(
        f'{path}: NIfTI writer takes uint8 or float32 volumes, got {array.dtype}')
  if array.shape != grid.shape:
    raise errors.InputError(
        f'{path}: volume shape {array.shape} differs from the grid {grid.shape}')
  image = nibabel.Nifti1Image(array, affine=None)
  image.set_qform(grid.affine, code='scanner')
  image.set_sform(grid.affine, code='scanner')
  image.header.set_xyzt_units(xyz='mm')
  image.header['descrip'] = description.encode('ascii', 'replace')[:79]
  nibabel.save(image, path)


def write_h5(path: str | os.PathLike, volume: Volume, **attrs) -> None:
  """Writes 'volume' (X, Y, Z) float32, 'mask' (X, Y, Z) uint8, 'spacing' and 'origin' (mm)."""
  with h5py.File(os.fspath(path), 'w') as f:
    f.create_dataset('volume', data=volume.data, compression='gzip', shuffle=True)
    f.create_dataset('mask', data=volume.mask.astype(np.uint8), compression='gzip')
    f.create_dataset('spacing', data=volume.grid.spacing)
    f.create_dataset('origin', data=volume.grid.origin)
    f.attrs['axes'] = ('volume[i, j, k] is centred at origin + (i, j, k) * spacing (mm) in the '
                       'reference frame (x lateral, y axial, z = x cross y)')
    f.attrs['mask'] = '1 where at least one pixel was compounded into the voxel'
    for key, value in attrs.items():
      f.attrs[key] = value


def slices_figure(volume: Volume, title: str = '') -> Figure:
  """Three orthogonal mid-slices of the grid (x-y, x-z and z-y planes); empty voxels in blue."""
  data = np.ma.masked_array(volume.data, mask=~volume.mask)
  grid = volume.grid
  lo = grid.origin - grid.spacing / 2
  hi = grid.origin + (np.asarray(grid.shape) - 0.5) * grid.spacing
  mid = [s // 2 for s in grid.shape]
  centre = grid.origin + np.asarray(mid) * grid.spacing
  vmax = float(data.max()) if data.count() else 1.0
  # (image rows x columns, horizontal axis, vertical axis, fixed axis); y (depth) points down.
  panels = ((data[:, :, mid[2]].T, 0, 1, 2), (data[:, mid[1], :].T, 0, 2, 1),
            (data[mid[0], :, :], 2, 1, 0))
  cmap = matplotlib.colormaps['gray'].with_extremes(bad='midnightblue')
  fig = Figure(figsize=(13, 4.6), dpi=80)
  FigureCanvasAgg(fig)
  names = 'xyz'
  for panel, (image, a, b, fixed) in enumerate(panels):
    ax = fig.add_subplot(1, 3, panel + 1)
    depth_down = b == 1
    ax.imshow(image, cmap=cmap, vmin=0, vmax=vmax, interpolation='nearest',
              extent=(lo[a], hi[a], hi[b], lo[b]) if depth_down else (lo[a], hi[a], lo[b], hi[b]),
              origin='upper' if depth_down else 'lower')
    ax.set_xlabel(f'{names[a]} (mm)')
    ax.set_ylabel(f'{names[b]} (mm)')
    ax.set_title(f'{names[a]}-{names[b]} plane, {names[fixed]} = {centre[fixed]:.1f} mm',
                 fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig
