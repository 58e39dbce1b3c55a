"""Predicted vs. true 3D probe trajectories as three orthogonal projections (matplotlib, no GUI)."""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

_PROJECTIONS = ((0, 1), (0, 2), (1, 2))
_AXIS_NAMES = 'xyz'


def _image_points(image_shape) -> np.ndarray:
  """Homogeneous pixel coordinates (x=column, y=row) of the image centre and its 4 corners."""
  h, w = image_shape
  return np.array([[w / 2, h / 2, 0, 1], [0, 0, 0, 1], [w, 0, 0, 1], [w, h, 0, 1], [0, h, 0, 1]],
                  dtype=np.float64).T


def trajectory_points(global_transforms, pixel_to_image=None, image_shape=None) -> np.ndarray:
  """(N, 5, 3) positions of the image centre and corners of every frame (in frame 0's space).

  Without `pixel_to_image`/`image_shape`, all five points are the frame origin t(G_i).
  """
  g = np.asarray(global_transforms, np.float64)
  if pixel_to_image is None or image_shape is None:
    return np.repeat(g[:, None, :3, 3], 5, axis=1)
  points = np.asarray(pixel_to_image, np.float64) @ _image_points(image_shape)  # (4, 5)
  return np.einsum('nij,jk->nki', g, points)[..., :3]


def trajectory_figure(pred_global, gt_global, *, title: str = '', pixel_to_image=None,
                      image_shape=None, outline_every: int = 0) -> Figure:
  """Three projections (x-y, x-z, y-z) of the predicted and true image-centre trajectories.

  Args:
    pred_global: (N, 4, 4) predicted global transforms (G_0 = I).
    gt_global: (N, 4, 4) ground-truth global transforms, or None (prediction only).
    title: figure title (e.g. the sweep id and its errors).
    pixel_to_image: optional (4, 4) pixel -> image (mm) matrix; with `image_shape` the image centre
      (instead of the frame origin) is plotted, and frame outlines can be drawn.
    image_shape: optional (H, W).
    outline_every: draw the frame outline every this many frames (0 = none; needs the two above).
  """
  return comparison_figure({'predicted': pred_global}, gt_global, title=title,
                           pixel_to_image=pixel_to_image, image_shape=image_shape,
                           outline_every=outline_every)


# The true trajectory's colour, then the predictions' in order (matplotlib's tab10 without blue).
_COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown',
           'tab:pink', 'tab:gray', 'tab:olive', 'tab:cyan')


def comparison_figure(predictions, gt_global, *, title: str = '', pixel_to_image=None,
                      image_shape=None, outline_every: int = 0) -> Figure:
  """`trajectory_figure` with one line per method: `predictions` maps a label to its (N, 4, 4)
  global transforms (in the legend's order); the other arguments are `trajectory_figure`'s."""
  colors = iter(_COLORS[1:] * (1 + len(predictions) // (len(_COLORS) - 1)))
  curves = [(trajectory_points(g, pixel_to_image, image_shape), next(colors), label)
            for label, g in predictions.items()]
  if gt_global is not None:
    curves.insert(0, (trajectory_points(gt_global, pixel_to_image, image_shape), _COLORS[0],
                      'true'))
  fig = Figure(figsize=(12, 4.2), dpi=80)
  FigureCanvasAgg(fig)
  for panel, (a, b) in enumerate(_PROJECTIONS):
    ax = fig.add_subplot(1, 3, panel + 1)
    for points, color, label in curves:
      ax.plot(points[:, 0, a], points[:, 0, b], color=color, label=label, lw=1.5)
      ax.plot(points[0, 0, a], points[0, 0, b], 'o', color=color, ms=4)
      if outline_every and pixel_to_image is not None and image_shape is not None:
        for frame in points[::outline_every]:
          corners = frame[[1, 2, 3, 4, 1]]
          ax.plot(corners[:, a], corners[:, b], color=color, lw=0.5, alpha=0.5)
    ax.set_xlabel(f'{_AXIS_NAMES[a]} (mm)')
    ax.set_ylabel(f'{_AXIS_NAMES[b]} (mm)')
    ax.set_aspect('equal', adjustable='datalim')
    ax.grid(True, lw=0.3)
  fig.axes[0].legend(loc='best', fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def sweep_comparisons(runs) -> dict[str, Figure]:
  """One `comparison_figure` per sweep that every run evaluated, named 'compare/<sweep_id>'.

  Args:
    runs: {run name: the sweeps of its evaluation (`SweepEvaluator`'s EvalResult.sweeps: dicts
      with sweep_id, pred_global, gt_global, pixel_to_image, image_shape)}, in legend order.
  """
  by_run = {name: {s['sweep_id']: s for s in sweeps} for name, sweeps in runs.items()}
  common = [i for i in next(iter(by_run.values()), {}) if all(i in s for s in by_run.values())]
  figures = {}
  for sweep_id in common:
    first = next(iter(by_run.values()))[sweep_id]
    figures[f'compare/{sweep_id}'] = comparison_figure(
        {name: sweeps[sweep_id]['pred_global'] for name, sweeps in by_run.items()},
        first['gt_global'], title=str(sweep_id), pixel_to_image=first.get('pixel_to_image'),
        image_shape=first.get('image_shape'))
  return figures
