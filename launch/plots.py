"""Named pictures for TensorBoard and files: figures as arrays, names as file names."""
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def to_array(picture) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a matplotlib Figure (rendered), or the array itself."""
  if isinstance(picture, np.ndarray):
    return picture
  canvas = picture.canvas if isinstance(picture.canvas, FigureCanvasAgg) else FigureCanvasAgg(
      picture)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(picture, path: str) -> None:
  """Writes a Figure or an (H, W, 3) uint8 array as a PNG file."""
  if isinstance(picture, Figure):
    picture.savefig(path)
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(np.asarray(picture, np.uint8)).save(path)


def safe_filename(name: str) -> str:
  """A sweep id made safe as a file name ('a/b c' -> 'a_b_c')."""
  return re.sub(r'[^A-Za-z0-9._-]+', '_', str(name)).strip('_') or 'sweep'
