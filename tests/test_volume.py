"""Tests of dualtrack_jax/volume.py: compounding of known content, grids, writers, slice pictures.

A sweep of 40 frames (24x32 pixels of 0.5 mm) moves 0.25 mm per frame out of plane while drifting
and rotating by a few degrees. Its frames sample known content in the reference frame directly
(a linear ramp, a sphere), so the reconstruction can be compared with the truth at every voxel.
"""
import h5py
import nibabel
import numpy as np
import pytest

from dualtrack_jax import pose
from dualtrack_jax import volume

N, H, W = 40, 24, 32
PIXEL_TO_IMAGE = np.array([[0.5, 0, 0, -0.25 * (W - 1)], [0, 0.5, 0, -0.25 * (H - 1)],
                           [0, 0, 1, 0], [0, 0, 0, 1.0]])
_T = np.arange(N)
GLOBALS = pose.global_transforms(pose.pose_vector_to_matrix(np.stack([
    0.3 * np.sin(_T / 7), 0.2 * np.cos(_T / 5), 0.25 * _T,
    4 * np.sin(_T / 9), 3 * np.cos(_T / 11), 2 * np.sin(_T / 6)], axis=-1)))
GRADIENT = np.array([2.0, -3.0, 5.0])  # intensity per mm of the ramp


def _pixel_positions() -> np.ndarray:
  """(N, H, W, 3) reference-frame mm of every pixel, computed pixel by pixel (no separability)."""
  u, v = np.meshgrid(np.arange(W), np.arange(H))
  pixels = np.stack([u, v, np.zeros_like(u), np.ones_like(u)], axis=-1).astype(np.float64)
  return np.einsum('nij,hwj->nhwi', GLOBALS @ PIXEL_TO_IMAGE, pixels)[..., :3]


POSITIONS = _pixel_positions()
RAMP = 100.0 + POSITIONS @ GRADIENT
SPHERE_CENTRE = POSITIONS[N // 2, H // 2, W // 2]
SPHERE_RADIUS = 4.0
SPHERE = np.where(np.linalg.norm(POSITIONS - SPHERE_CENTRE, axis=-1) < SPHERE_RADIUS, 200,
                  50).astype(np.uint8)


def _voxel_centres(vol: volume.Volume) -> np.ndarray:
  idx = np.stack(np.meshgrid(*(np.arange(s) for s in vol.grid.shape), indexing='ij'), axis=-1)
  return vol.grid.origin + idx * vol.grid.spacing


@pytest.mark.parametrize('method, reach', [('pnn', 0.5), ('trilinear', 1.0)])
def test_ramp_is_reproduced_within_the_voxel_reach(method, reach):
  """Every pixel adding to a voxel lies within `reach` voxels of its centre along each axis."""
  vol = volume.reconstruct(RAMP, GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method)
  assert vol.data.dtype == np.float32 and vol.data.shape == vol.grid.shape
  mask = vol.mask
  assert mask.mean() > 0.75  # frames 0.25 mm apart fill most voxels of their bounding box
  truth = 100.0 + _voxel_centres(vol) @ GRADIENT
  bound = reach * np.abs(GRADIENT) @ vol.grid.spacing
  error = np.abs(vol.data - truth)[mask]
  assert error.max() <= bound + 1e-3
  assert error.mean() < bound / 3  # errors of neighbouring pixels average out, not all at the bound
  assert np.all(vol.data[~mask] == 0)


@pytest.mark.parametrize('method, reach', [('pnn', 0.5), ('trilinear', 1.0)])
def test_sphere_is_exact_away_from_its_surface(method, reach):
  vol = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method)
  distance = np.linalg.norm(_voxel_centres(vol) - SPHERE_CENTRE, axis=-1)
  margin = reach * np.linalg.norm(vol.grid.spacing)
  inside = vol.mask & (distance < SPHERE_RADIUS - margin)
  outside = vol.mask & (distance > SPHERE_RADIUS + margin)
  assert inside.sum() > 500 and outside.sum() > 5000
  np.testing.assert_allclose(vol.data[inside], 200, rtol=1e-6)
  np.testing.assert_allclose(vol.data[outside], 50, rtol=1e-6)


def test_pnn_counts_every_pixel_once():
  vol = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.5)
  # The default grid holds every pixel's nearest voxel.
  assert vol.weight.sum() == N * H * W
  assert np.array_equal(vol.weight, np.round(vol.weight))
  # A voxel's value is the mean of the pixels that fell into it: the total intensity is kept.
  assert (vol.data * vol.weight).sum() == pytest.approx(SPHERE.astype(np.float64).sum(),
                                                        rel=1e-6)


def test_trilinear_splat_keeps_mass_and_centre_of_mass():
  """Trilinear weights sum to one and interpolate positions linearly, for every pixel."""
  grid = volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), 0.5)
  margin = volume.Grid(shape=tuple(s + 2 for s in grid.shape), origin=grid.origin - 0.5,
                       spacing=grid.spacing)  # room for every pixel's 8 neighbours
  vol = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, grid=margin, method='trilinear')
  centres = _voxel_centres(vol)
  assert vol.weight.sum() == pytest.approx(N * H * W, rel=1e-6)
  np.testing.assert_allclose(np.einsum('xyz,xyzi->i', vol.weight.astype(np.float64), centres),
                             POSITIONS.reshape(-1, 3).sum(axis=0), rtol=1e-5)
  mass = (vol.data * vol.weight).astype(np.float64)
  assert mass.sum() == pytest.approx(SPHERE.astype(np.float64).sum(), rel=1e-6)
  np.testing.assert_allclose(np.einsum('xyz,xyzi->i', mass, centres),
                             np.einsum('nhw,nhwi->i', SPHERE.astype(np.float64), POSITIONS),
                             rtol=1e-5)


@pytest.mark.parametrize('method', volume.METHODS)
def test_chunked_equals_unchunked_and_h5_input(method, tmp_path):
  whole = volume.reconstruct(RAMP, GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method,
                             frames_per_chunk=N)
  single = volume.reconstruct(RAMP, GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method,
                              frames_per_chunk=1)
  # Additions come in pixel order whatever the chunking: bit-identical.
  assert np.array_equal(whole.data, single.data) and np.array_equal(whole.weight, single.weight)
  path = tmp_path / 'frames.h5'
  with h5py.File(path, 'w') as f:
    f.create_dataset('images', data=SPHERE, chunks=(1, H, W))
  with h5py.File(path, 'r') as f:
    from_file = volume.reconstruct(f['images'], GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method,
                                   frames_per_chunk=7)
  in_memory = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.5, method=method)
  assert np.array_equal(from_file.data, in_memory.data)


def test_bounding_grid_covers_the_frames_and_crops():
  grid = volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), (0.5, 0.4, 0.3))
  corners = volume.frame_corners(GLOBALS, PIXEL_TO_IMAGE, (H, W)).reshape(-1, 3)
  np.testing.assert_allclose(grid.origin, corners.min(axis=0))
  np.testing.assert_allclose(grid.spacing, [0.5, 0.4, 0.3])
  last_centre = grid.origin + (np.asarray(grid.shape) - 1) * grid.spacing
  assert np.all(last_centre + grid.spacing / 2 >= corners.max(axis=0))
  assert np.all(last_centre - grid.spacing / 2 <= corners.max(axis=0))
  np.testing.assert_allclose(grid.affine @ [1, 2, 3, 1], [*(grid.origin + [0.5, 0.8, 0.9]), 1])
  # A crop on the same voxel lattice gives the full reconstruction's voxels of the box (up to
  # float32 rounding of pixels within 1e-6 voxel of a rounding tie).
  full = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.5)
  low = full.grid.origin + 4 * 0.5
  box = volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), 0.5, bounds=(low, low + 8 * 0.5))
  assert box.shape == (9, 9, 9)
  cropped = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, grid=box)
  assert cropped.grid is box
  assert np.mean(cropped.data == full.data[4:13, 4:13, 4:13]) > 0.99
  assert cropped.weight.sum() < full.weight.sum()
  # A frame 1e12 mm away adds nothing (no integer overflow wraps its pixels into the box).
  far = GLOBALS.copy()
  far[5, :3, 3] = [3e12, -3e12, 1e12]
  keep = np.arange(N) != 5
  for method in volume.METHODS:
    with_far = volume.reconstruct(SPHERE, far, PIXEL_TO_IMAGE, grid=box, method=method)
    without = volume.reconstruct(SPHERE[keep], GLOBALS[keep], PIXEL_TO_IMAGE, grid=box,
                                 method=method)
    assert np.array_equal(with_far.weight, without.weight)


def test_voxel_limit_is_a_clear_error():
  with pytest.raises(ValueError, match=r'spacing \[0\.05, 0\.05, 0\.05\] mm .* > '
                                       r'max_voxels=1,000,000; use a spacing of about'):
    volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.05, max_voxels=10 ** 6)
  # The suggested spacing fits.
  with pytest.raises(ValueError) as e:
    volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), 0.05, max_voxels=10 ** 6)
  suggested = float(str(e.value).split('spacing of about ')[1].split(' mm')[0])
  assert volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), suggested,
                              max_voxels=10 ** 6).num_voxels <= 10 ** 6


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match=r'frames must be \(N, H, W\) with N = 40'):
    volume.reconstruct(SPHERE[:-1], GLOBALS, PIXEL_TO_IMAGE)
  with pytest.raises(ValueError, match='method must be one of'):
    volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, method='nearest')
  with pytest.raises(ValueError, match='spacing must be positive'):
    volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, (0.5, 0, 0.5))
  bad = GLOBALS.copy()
  bad[3, 0, 3] = np.nan
  with pytest.raises(ValueError, match=r'global_transforms\[3\] is not finite'):
    volume.reconstruct(SPHERE, bad, PIXEL_TO_IMAGE)
  with pytest.raises(ValueError, match='bounds must be'):
    volume.bounding_grid(GLOBALS, PIXEL_TO_IMAGE, (H, W), 0.5, bounds=((0, 0, 0), (1, -1, 1)))


# The header's descrip holds 79 ASCII characters: longer or non-ASCII descriptions are cut and
# replaced rather than refused.
@pytest.mark.parametrize('name, dtype, description, descrip', [
    ('v.nii.gz', np.float32, 'test volume', b'test volume'),
    ('v.nii', np.uint8, '\u00b5' + 'x' * 100, b'?' + b'x' * 78)])
def test_nifti_reads_back_with_spacing_and_origin(tmp_path, name, dtype, description, descrip):
  grid = volume.Grid(shape=(5, 7, 3), origin=np.array([-3.25, 1.5, 10.0]),
                     spacing=np.array([0.5, 0.25, 2.0]))
  array = (np.random.default_rng(0).random(grid.shape) * 255).astype(dtype)
  volume.write_nifti(tmp_path / name, array, grid, description=description)
  # Gzipped exactly when the name ends .gz.
  assert ((tmp_path / name).read_bytes()[:2] == b'\x1f\x8b') == name.endswith('.gz')
  image = nibabel.load(tmp_path / name)
  assert isinstance(image, nibabel.Nifti1Image)
  header = image.header
  # The affine maps voxel (i, j, k) to origin + (i, j, k) * spacing, in both qform and sform.
  expected = np.array([[0.5, 0, 0, -3.25], [0, 0.25, 0, 1.5], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
  np.testing.assert_allclose(image.affine, expected)
  np.testing.assert_allclose(header.get_qform(), expected)
  np.testing.assert_allclose(header.get_sform(), expected)
  assert (int(header['qform_code']), int(header['sform_code'])) == (1, 1)  # scanner
  np.testing.assert_allclose(header.get_zooms(), grid.spacing)
  np.testing.assert_allclose(image.affine[:3, 3], grid.origin)
  assert header.get_xyzt_units()[0] == 'mm'
  assert header['descrip'].item() == descrip
  assert image.get_data_dtype() == dtype
  # Stored unscaled (nibabel moves the file's scl_slope and scl_inter into the data proxy).
  assert (image.dataobj.slope, image.dataobj.inter) == (1.0, 0.0)
  data = np.asarray(image.dataobj)
  assert data.dtype == dtype and np.array_equal(data, array)


def test_nifti_refuses_other_dtypes_and_shapes(tmp_path):
  grid = volume.Grid(shape=(2, 2, 2), origin=np.zeros(3), spacing=np.ones(3))
  with pytest.raises(ValueError, match=r'v\.nii: NIfTI writer takes uint8 or float32'):
    volume.write_nifti(tmp_path / 'v.nii', np.zeros((2, 2, 2), np.float64), grid)
  with pytest.raises(ValueError, match='differs from the grid'):
    volume.write_nifti(tmp_path / 'v.nii', np.zeros((2, 2, 3), np.float32), grid)


def test_h5_and_slices_figure(tmp_path):
  vol = volume.reconstruct(SPHERE, GLOBALS, PIXEL_TO_IMAGE, 0.5)
  volume.write_h5(tmp_path / 'v.h5', vol, description='sphere')
  with h5py.File(tmp_path / 'v.h5', 'r') as f:
    assert np.array_equal(f['volume'][()], vol.data)
    assert np.array_equal(f['mask'][()], vol.mask.astype(np.uint8))
    np.testing.assert_array_equal(f['spacing'][()], vol.grid.spacing)
    np.testing.assert_array_equal(f['origin'][()], vol.grid.origin)
    assert f.attrs['description'] == 'sphere'
  fig = volume.slices_figure(vol, title='sphere')
  assert [ax.get_xlabel() for ax in fig.axes] == ['x (mm)', 'x (mm)', 'z (mm)']
  assert [ax.get_ylabel() for ax in fig.axes] == ['y (mm)', 'z (mm)', 'y (mm)']
  # The x-y panel spans the grid in mm, depth (y) pointing down.
  left, right, bottom, top = fig.axes[0].images[0].get_extent()
  assert (left, right) == pytest.approx((vol.grid.origin[0] - 0.25,
                                         vol.grid.origin[0] + (vol.grid.shape[0] - 0.5) * 0.5))
  assert bottom > top
  fig.savefig(tmp_path / 'slices.png')
  assert (tmp_path / 'slices.png').stat().st_size > 1000
