"""Tests of dualtrack_jax.data.transforms: labels survive every augmentation, resize matches PIL."""
import numpy as np
from PIL import Image
import pytest
from scipy.spatial.transform import Rotation

from dualtrack_jax import pose
from dualtrack_jax.data import transforms as T

H, W, N = 24, 32, 7
SPACING = (0.3, 0.2, 1.0)


def _pixel_to_image(h, w, spacing=SPACING):
  """Centred pixel -> mm matrix, written out independently of the module under test."""
  return np.array([[spacing[0], 0, 0, -spacing[0] * (w - 1) / 2],
                   [0, spacing[1], 0, -spacing[1] * (h - 1) / 2],
                   [0, 0, spacing[2], 0],
                   [0, 0, 0, 1.0]])


def _tracking(rng, n):
  """Random rigid image -> world transforms (SciPy is the reference for rotations)."""
  t = np.tile(np.eye(4), (n, 1, 1))
  t[:, :3, :3] = Rotation.from_rotvec(rng.normal(scale=0.5, size=(n, 3))).as_matrix()
  t[:, :3, 3] = rng.normal(scale=20.0, size=(n, 3))
  return t


def _item(seed=0, n=N, h=H, w=W):
  rng = np.random.default_rng(seed)
  return dict(images=rng.integers(0, 256, (n, h, w), dtype=np.uint8), tracking=_tracking(rng, n),
              pixel_to_image=_pixel_to_image(h, w), indices=np.arange(n, dtype=np.int32) + 100)


def _world(tracking, pixel_to_image, rows, cols):
  """World points (n, P, 3) of pixels (rows, cols) of every frame."""
  px = np.stack([cols, rows, np.zeros_like(rows), np.ones_like(rows)]).astype(np.float64)
  return (tracking @ pixel_to_image @ px)[:, :3].transpose(0, 2, 1)


def _scipy_pose_vectors(m):
  return np.concatenate([m[..., :3, 3], Rotation.from_matrix(m[..., :3, :3]).as_euler(
      'xyz', degrees=True)], axis=-1)


def test_crop_keeps_world_position_of_content():
  item = _item()
  top, left, (h, w) = 5, 9, (12, 16)
  out = T.crop(item, top, left, (h, w))
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  rows, cols = rows.ravel(), cols.ravel()
  np.testing.assert_array_equal(out['images'][:, rows, cols],
                                item['images'][:, rows + top, cols + left])
  np.testing.assert_allclose(_world(out['tracking'], out['pixel_to_image'], rows, cols),
                             _world(item['tracking'], item['pixel_to_image'], rows + top,
                                    cols + left), atol=1e-9)
  # The crop frame is centred: its middle maps to image-crop coordinates (0, 0).
  np.testing.assert_allclose(out['pixel_to_image'] @ [(w - 1) / 2, (h - 1) / 2, 0, 1],
                             [0, 0, 0, 1], atol=1e-12)
  np.testing.assert_array_equal(out['indices'], item['indices'])


def test_center_crop_matches_torchvision_convention():
  assert T.center_crop_params((480, 640), (256, 256)) == (112, 192)
  # torchvision rounds (H - h) / 2 with Python's round: 11.5 -> 12, 14.5 -> 14.
  assert T.center_crop_params((25, 31), (2, 2)) == (12, 14)
  item = _item(n=2, h=480, w=640)
  out = T.center_crop(item, (256, 256))
  np.testing.assert_array_equal(out['images'], item['images'][:, 112:368, 192:448])
  # The centre crop of a centred frame keeps the frame: the tracking does not change.
  np.testing.assert_allclose(out['tracking'], item['tracking'], atol=1e-12)


def test_random_crop_covers_all_positions_and_rejects_big_crops():
  rng = np.random.default_rng(0)
  seen = {T.random_crop_params(rng, (5, 6), (3, 3)) for _ in range(500)}
  assert seen == {(i, j) for i in range(3) for j in range(4)}
  with pytest.raises(ValueError, match=r'crop size \(25, 8\)'):
    T.center_crop(_item(), (25, 8))


def test_crop_rejects_rotated_pixel_to_image():
  item = _item()
  item['pixel_to_image'] = item['pixel_to_image'].copy()
  item['pixel_to_image'][0, 1] = 0.01
  with pytest.raises(ValueError, match='axis-aligned'):
    T.crop(item, 0, 0, (8, 8))


def test_flip_keeps_world_position_of_content():
  item = _item()
  out = T.horizontal_flip(item)
  rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing='ij')
  rows, cols = rows.ravel(), cols.ravel()
  np.testing.assert_array_equal(out['images'][:, rows, W - 1 - cols], item['images'][:, rows, cols])
  np.testing.assert_allclose(_world(out['tracking'], out['pixel_to_image'], rows, W - 1 - cols),
                             _world(item['tracking'], item['pixel_to_image'], rows, cols),
                             atol=1e-9)


def test_flip_twice_is_identity_and_flips_targets():
  item = _item()
  twice = T.horizontal_flip(T.horizontal_flip(item))
  np.testing.assert_array_equal(twice['images'], item['images'])
  np.testing.assert_array_equal(twice['tracking'], item['tracking'])
  flipped = T.add_targets(T.horizontal_flip(item))
  # Targets of the flipped item equal those of the tracking flipped by hand ...
  by_hand = item['tracking'] @ np.diag([-1.0, 1, 1, 1])
  np.testing.assert_allclose(flipped['targets'], _scipy_pose_vectors(
      np.linalg.inv(by_hand[:-1]) @ by_hand[1:]), atol=1e-4)
  # ... and mirror the original targets: F rel F negates tx, ry and rz.
  original = T.add_targets(item)
  np.testing.assert_allclose(flipped['targets'], original['targets'] * [-1, 1, 1, 1, -1, -1],
                             atol=1e-4)


def test_crop_and_flip_commute():
  item = _item()
  a = T.crop(T.horizontal_flip(item), 3, 4, (16, 16))  # flip a crop at the mirrored position
  b = T.horizontal_flip(T.crop(item, 3, W - 16 - 4, (16, 16)))
  np.testing.assert_array_equal(a['images'], b['images'])
  np.testing.assert_allclose(a['tracking'], b['tracking'], atol=1e-9)


def test_reverse_inverts_relative_transforms():
  item = T.add_targets(_item())
  rev = T.add_targets(T.reverse(item))
  np.testing.assert_array_equal(rev['images'], item['images'][::-1])
  np.testing.assert_array_equal(rev['indices'], item['indices'])  # positions stay ascending
  rel = pose.pose_vector_to_matrix(item['targets'].astype(np.float64))
  np.testing.assert_allclose(pose.pose_vector_to_matrix(rev['targets'].astype(np.float64)),
                             np.linalg.inv(rel)[::-1], atol=1e-4)


def test_random_subsample_keeps_frames_consistent():
  item = _item(n=30)
  item['global_images'] = item['images'][:, :4, :4] + 1
  out = T.random_subsample(item, np.random.default_rng(3), keep_fraction=0.9)
  kept = out['indices'] - 100
  assert len(kept) == 27 and np.all(np.diff(kept) > 0)
  np.testing.assert_array_equal(out['images'], item['images'][kept])
  np.testing.assert_array_equal(out['global_images'], item['global_images'][kept])
  np.testing.assert_array_equal(out['tracking'], item['tracking'][kept])


def test_augment_probabilities_and_determinism():
  item = _item()
  none = T.Augmentation(flip_p=0, reverse_p=0, subsample_p=0)
  out = T.augment(item, np.random.default_rng(0), none)
  np.testing.assert_array_equal(out['images'], item['images'])
  every = T.Augmentation(flip_p=1, reverse_p=1, subsample_p=0)
  out = T.augment(item, np.random.default_rng(0), every)
  np.testing.assert_array_equal(out['images'], item['images'][::-1, :, ::-1])
  a = T.augment(item, np.random.default_rng(5), T.FUSION_2025_AUGMENT)
  b = T.augment(item, np.random.default_rng(5), T.FUSION_2025_AUGMENT)
  np.testing.assert_array_equal(a['images'], b['images'])


def test_add_targets_matches_scipy():
  item = _item()
  out = T.add_targets(item)
  t = item['tracking']
  assert out['targets'].dtype == np.float32 and out['targets'].shape == (N - 1, 6)
  np.testing.assert_allclose(out['targets'],
                             _scipy_pose_vectors(np.linalg.inv(t[:-1]) @ t[1:]), atol=1e-4)
  np.testing.assert_allclose(out['targets_global'],
                             _scipy_pose_vectors(np.linalg.inv(t[:1]) @ t[1:]), atol=1e-4)


# PIL's mode 'F' resampler is the reference implementation of antialiased bilinear resizing that
# torchvision's Resize(antialias=True) reproduces; both compute in floating point, so we agree to
# float32 rounding (1e-6 on values in [0, 1]).
@pytest.mark.parametrize('in_hw,out_hw', [((480, 640), (224, 224)), ((37, 53), (11, 7)),
                                          ((24, 32), (224, 224)), ((5, 7), (13, 6))])
def test_resize_matches_pil(in_hw, out_hw):
  x = np.random.default_rng(0).random(in_hw, dtype=np.float32)
  ref = np.asarray(Image.fromarray(x, mode='F').resize(out_hw[::-1], Image.BILINEAR))
  np.testing.assert_allclose(T.resize(x, out_hw), ref, atol=1e-6)


def test_resize_matrix_rows_are_normalised_and_identity_at_same_size():
  m = T.resize_matrix(640, 224)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
  assert (np.count_nonzero(m, axis=1) <= 7).all()  # support 2 * 640 / 224 wide
  np.testing.assert_array_equal(T.resize_matrix(9, 9), np.eye(9))


def test_context_images_crop_border_then_resize():
  x = np.random.default_rng(1).random((2, 480, 640), dtype=np.float32)
  out = T.context_images(x)
  assert out.shape == (2, 224, 224)
  ref = np.asarray(Image.fromarray(x[1, 50:430, 50:590], mode='F').resize((224, 224),
                                                                         Image.BILINEAR))
  np.testing.assert_allclose(out[1], ref, atol=1e-6)
  with pytest.raises(ValueError, match='border'):
    T.context_images(x[:, :90])


def test_to_unit_float_is_division_by_255():
  x = np.arange(256, dtype=np.uint8)
  out = T.to_unit_float(x)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, x.astype(np.float32) / np.float32(255))
  assert out[0] == 0 and out[-1] == 1
