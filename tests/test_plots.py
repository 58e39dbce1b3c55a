"""Tests of dualtrack_jax/plots.py (trajectory plots) and launch/plots.py (pictures)."""
import numpy as np
from PIL import Image

from dualtrack_jax import interface
from dualtrack_jax import plots
from launch import plots as launch_plots


def _pose(angle_deg, translation):
  a = np.deg2rad(angle_deg)
  g = np.eye(4)
  g[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
  g[:3, 3] = translation
  return g


def test_trajectory_points_use_image_centre_and_corners():
  g = np.stack([np.eye(4), _pose(90, [10, 0, 5])])
  pixel_to_image = np.diag([0.5, 0.25, 1.0, 1.0])  # 0.5 mm per column, 0.25 mm per row
  points = plots.trajectory_points(g, pixel_to_image, image_shape=(40, 20))  # H=40, W=20
  assert points.shape == (2, 5, 3)
  # Frame 0: centre at (W/2 * 0.5, H/2 * 0.25) = (5, 5); corner (W, 0) at (10, 0).
  np.testing.assert_allclose(points[0, 0], [5, 5, 0])
  np.testing.assert_allclose(points[0, 2], [10, 0, 0])
  # Frame 1 rotates by 90 degrees about z, then translates: (x, y) -> (-y + 10, x).
  np.testing.assert_allclose(points[1, 0], [5, 5, 5], atol=1e-12)
  np.testing.assert_allclose(points[1, 2], [10, 10, 5], atol=1e-12)
  # Without calibration: the frame origins.
  np.testing.assert_allclose(plots.trajectory_points(g)[:, 0], [[0, 0, 0], [10, 0, 5]])


def test_trajectory_figure_renders():
  steps = np.cumsum(np.ones((5, 3)), axis=0)
  gt = np.tile(np.eye(4), (5, 1, 1))
  gt[:, :3, 3] = steps
  pred = gt.copy()
  pred[:, 0, 3] *= 1.5
  fig = plots.trajectory_figure(pred, gt, title='sweep 1', pixel_to_image=np.eye(4),
                                image_shape=(4, 6), outline_every=2)
  image = launch_plots.to_array(fig)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert len(fig.axes) == 3 and fig.axes[1].get_xlabel() == 'x (mm)'
  assert fig.axes[1].get_ylabel() == 'z (mm)'
  # Both trajectories and their start markers, plus 3 outlines each (frames 0, 2, 4).
  assert len(fig.axes[0].lines) == 2 * (2 + 3)
  assert image.std() > 0  # not blank


def test_pictures_are_saved_and_named_safely(tmp_path):
  picture = np.zeros((4, 6, 3), np.uint8)
  picture[1, 2] = 255
  assert launch_plots.to_array(picture) is picture
  launch_plots.save_png(picture, str(tmp_path / 'a.png'))
  with Image.open(tmp_path / 'a.png') as image:
    np.testing.assert_array_equal(np.asarray(image), picture)
  assert launch_plots.safe_filename('tus-rec/000 a b') == 'tus-rec_000_a_b'


class _Result:
  """What a DualTrack experiment's evaluate returns, as far as comparisons read it."""

  def __init__(self, *sweeps):
    self.sweeps = list(sweeps)


def _sweep(index: int, dx: float) -> dict:
  gt = np.stack([np.eye(4), _pose(10, [1, 0, 0])])
  pred = gt.copy()
  pred[:, 0, 3] += dx
  return dict(sweep_id=f'val/{index}', pred_global=pred, gt_global=gt, pixel_to_image=np.eye(4),
              image_shape=(4, 6))


def test_runs_are_compared_per_sweep():
  figures = interface.compare_figures({'a': _Result(_sweep(0, 0.1), _sweep(1, 0.1)),
                                       'b': _Result(_sweep(1, 0.2))})
  assert list(figures) == ['compare/val/1']  # only the sweeps every run evaluated
  (ax, *_) = figures['compare/val/1'].axes
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['true', 'a', 'b']
