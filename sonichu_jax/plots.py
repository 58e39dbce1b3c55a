"""The keypoint overlay: an image with its numbered keypoints, measured segments and values."""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from sonichu_jax import metrics
from sonichu_jax import tasks


def _segments(task: tasks.Task) -> list[tuple[int, int]]:
  """The keypoint pairs drawn as segments: the measured distances, or the AoP's two arms."""
  if task.measurement == 'angle':
    a, vertex, b = metrics.AOP_ANGLE_KEYPOINTS
    return [(vertex, a), (vertex, b)]
  return [(i, i + 1) for i in range(0, task.num_keypoints - 1, 2)]


def keypoint_overlay(image: np.ndarray, keypoints_px: np.ndarray, task: str,
                     measurements: dict[str, float], title: str = '') -> Figure:
  """The grayscale image with numbered keypoints, the measured segments and the values."""
  spec = tasks.get_task(task)
  h, w = image.shape
  fig = Figure(figsize=(6.0, 6.0 * h / w + 0.6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_axes((0.0, 0.0, 1.0, h / (h + 0.1 * w)))
  # Pixel (i, j) covers [j, j + 1) x [i, i + 1): the keypoints' continuous coordinates.
  ax.imshow(image, cmap='gray', vmin=0, vmax=255, extent=(0, w, h, 0), interpolation='nearest')
  for a, b in _segments(spec):
    ax.plot(keypoints_px[[a, b], 0], keypoints_px[[a, b], 1], '-', color='yellow', lw=1.2)
  ax.plot(keypoints_px[:, 0], keypoints_px[:, 1], 'o', ms=4, mfc='red', mec='white', mew=0.6)
  for k, (x, y) in enumerate(keypoints_px):
    ax.annotate(str(k), (x, y), xytext=(3, 3), textcoords='offset points', color='cyan',
                fontsize=7)
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.axis('off')
  unit = {'angle': ' deg'}.get(spec.measurement, ' px')
  values = ', '.join(f'{k} {v:.1f}{unit}' for k, v in measurements.items())
  fig.suptitle(f'{title}\n{task}: {values}' if title else f'{task}: {values}', fontsize=8)
  return fig
