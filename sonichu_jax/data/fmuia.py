"""The FM_UIA 2026 challenge layout for keypoint tasks: reader, writer, validation.

A split folder (e.g. `data/train`) holds `csv_files/*.csv` and the images they name:

| column        | meaning                                                                |
|---------------|------------------------------------------------------------------------|
| `image_path`  | image file, relative to `csv_files/` (`../Regression/HC/001.png`)      |
| `task_id`     | one of the SONICHU tasks (`sonichu_jax.tasks.TASK_NAMES`)              |
| `task_name`   | `Regression` for keypoint rows; rows of other kinds are skipped        |
| `num_classes` | the number of keypoints K of the task                                  |
| `point_i_xy`  | JSON "[x, y]" of keypoint i (1-based) in original-image pixels         |

The challenge keeps its segmentation, classification and detection CSVs in the same folder, hence
the `task_name` filter, as in its loader (rows with an empty or no `task_name` are keypoint rows).
An empty or absent `point_i_xy` is a missing keypoint: the record stores (0, 0) there, as the
challenge's loader and evaluator do, and marks it invisible in `visible` so that losses can mask
it.

Coordinates are continuous with the image spanning [0, W] x [0, H] (pixel (row i, column j)
covers [j, j + 1) x [i, i + 1)), so x / W is the challenge's normalisation and a horizontal mirror
maps x to W - x, consistent with the soft-argmax's pixel-centre convention (docs/sonichu.md,
section "Soft-argmax").

Errors (`AnnotationError`) name the CSV file, its line and the column: a missing column, an
unknown task, K different from the task's, an unparsable or non-finite point, a point beyond K, a
duplicate image of a task, a missing or unreadable image.
"""
from collections.abc import Iterable, Sequence
import csv
import dataclasses
import glob
import json
import math
import os

import numpy as np
from PIL import Image

from sonichu_jax import preprocess
from sonichu_jax import tasks
from ultrasound_common import errors
from ultrasound_common import files

CSV_DIR = 'csv_files'
REGRESSION = 'Regression'
IMAGE_PATH, TASK_ID, TASK_NAME, NUM_CLASSES = 'image_path', 'task_id', 'task_name', 'num_classes'
REQUIRED_COLUMNS = (IMAGE_PATH, TASK_ID, NUM_CLASSES)


def point_column(i: int) -> str:
  """Name of the column of keypoint i (0-based): 'point_{i+1}_xy'."""
  return f'point_{i + 1}_xy'


class AnnotationError(errors.InputError):
  """A keypoint CSV or an image it names is malformed; the message names file, line and column."""

  def __init__(self, path: str, message: str, *, line: int | None = None,
               column: str | None = None):
    where = path if line is None else f'{path}, line {line}'
    if column is not None:
      where += f', column {column!r}'
    super().__init__(f'{where}: {message}')


@dataclasses.dataclass(frozen=True, eq=False)
class KeypointRecord:
  """One annotated image.

  Attributes:
    image_path: absolute path of the image file.
    image_ref: `image_path` as written in the CSV (what FM_UIA prediction files refer to).
    task: the task name.
    keypoints: (K, 2) float64 (x, y) in original-image pixels; (0, 0) where missing.
    visible: (K,) bool, False where the CSV has no point.
    image_hw: (H, W) of the image file.
    source: 'csv path:line' of the annotation, for messages.
  """
  image_path: str
  image_ref: str
  task: str
  keypoints: np.ndarray
  visible: np.ndarray
  image_hw: tuple[int, int]
  source: str


def _parse_point(text: str, path: str, line: int, column: str) -> tuple[float, float]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = None
  if (not isinstance(value, list) or len(value) != 2
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    raise AnnotationError(path, f'{text!r} is not a JSON pair "[x, y]" of numbers', line=line,
                          column=column)
  if not all(math.isfinite(v) for v in value):
    raise AnnotationError(path, f'non-finite coordinate in {text!r}', line=line, column=column)
  return float(value[0]), float(value[1])


def image_size(path: str) -> tuple[int, int]:
  """(H, W) of an image file, from its header (the pixels are not decoded)."""
  with Image.open(path) as image:
    width, height = image.size
  return height, width


def read_image(record: KeypointRecord) -> np.ndarray:
  """The record's image as (H, W) uint8 grayscale (`preprocess.read_gray`: any bit depth)."""
  try:
    pixels = preprocess.read_gray(record.image_path)
  except errors.InputError as e:
    raise AnnotationError(record.source, str(e), column=IMAGE_PATH) from e
  if pixels.shape != record.image_hw:
    raise AnnotationError(record.source, f'image {record.image_path} is now {pixels.shape}, '
                          f'was {record.image_hw} when the CSV was read', column=IMAGE_PATH)
  return pixels


def read_csv(csv_path: str | os.PathLike,
             task_names: Iterable[str] | None = None) -> list[KeypointRecord]:
  """The keypoint records of one CSV, in file order (of `task_names` only, if given).

  Raises AnnotationError (see the module docstring); unknown names in `task_names` raise ValueError.
  """
  path = os.path.abspath(os.fspath(csv_path))
  wanted = None if task_names is None else {tasks.get_task(t).name for t in task_names}
  base = os.path.dirname(path)
  records = []
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for column in REQUIRED_COLUMNS:
      if column not in header:
        raise AnnotationError(path, f'missing column; the header is {header}', line=1,
                              column=column)
    point_columns = [c for c in header if c.startswith('point_') and c.endswith('_xy')]
    for row in reader:
      line = reader.line_num
      if (row.get(TASK_NAME) or REGRESSION) != REGRESSION:
        continue
      name = row[TASK_ID]
      try:
        task = tasks.get_task(name)
      except ValueError as e:
        raise AnnotationError(path, str(e), line=line, column=TASK_ID) from None
      if wanted is not None and name not in wanted:
        continue
      try:
        num = float(row[NUM_CLASSES])  # '4' or, written by pandas next to empty cells, '4.0'
      except (TypeError, ValueError):
        num = None
      if num != task.num_keypoints:
        raise AnnotationError(path, f'{row[NUM_CLASSES]!r} keypoints, but task {name} has '
                              f'{task.num_keypoints}', line=line, column=NUM_CLASSES)
      keypoints = np.zeros((task.num_keypoints, 2))
      visible = np.zeros(task.num_keypoints, bool)
      for i in range(task.num_keypoints):
        text = (row.get(point_column(i)) or '').strip()
        if text:
          keypoints[i] = _parse_point(text, path, line, point_column(i))
          visible[i] = True
      for column in point_columns:
        index = column[len('point_'):-len('_xy')]
        if (row[column] or '').strip() and not (
            index.isdigit() and 1 <= int(index) <= task.num_keypoints):
          raise AnnotationError(path, f'a point beyond the {task.num_keypoints} keypoints of '
                                f'task {name}', line=line, column=column)
      ref = row[IMAGE_PATH]
      image_path = os.path.normpath(os.path.join(base, ref))
      if not ref or not os.path.isfile(image_path):
        raise AnnotationError(path, f'image {image_path} does not exist', line=line,
                              column=IMAGE_PATH)
      try:
        image_hw = image_size(image_path)
      except OSError as e:
        raise AnnotationError(path, f'cannot read image {image_path}: {e}', line=line,
                              column=IMAGE_PATH) from e
      records.append(KeypointRecord(image_path, ref, name, keypoints, visible, image_hw,
                                    f'{path}:{line}'))
  return records


def load_split(split_dir: str | os.PathLike,
               task_names: Iterable[str] | None = None) -> list[KeypointRecord]:
  """All keypoint records under `split_dir/csv_files/*.csv` (files in name order).

  Raises AnnotationError if the folder has no CSV, or an image appears twice for one task.
  """
  split_dir = os.path.abspath(os.fspath(split_dir))
  csv_files = sorted(glob.glob(os.path.join(split_dir, CSV_DIR, '*.csv')))
  if not csv_files:
    raise AnnotationError(os.path.join(split_dir, CSV_DIR), 'no *.csv file')
  records, seen = [], {}
  for csv_file in csv_files:
    for record in read_csv(csv_file, task_names):
      key = (record.task, record.image_path)
      if key in seen:
        raise AnnotationError(record.source, f'image {record.image_path} of task {record.task} '
                              f'is already annotated at {seen[key]}', column=IMAGE_PATH)
      seen[key] = record.source
      records.append(record)
  return records


def write_csv(csv_path: str | os.PathLike, rows: Sequence[tuple[str, str, np.ndarray]]) -> None:
  """Writes keypoint rows (image_ref, task, (K, 2) keypoints in pixels) in the FM_UIA layout.

  Coordinates are written with 3 decimals (1e-3 px); `image_ref` is relative to the CSV's folder.
  """
  max_k = max((tasks.get_task(task).num_keypoints for _, task, _ in rows), default=0)
  header = [IMAGE_PATH, TASK_ID, TASK_NAME, NUM_CLASSES] + [point_column(i) for i in range(max_k)]
  with files.atomic_output(csv_path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for ref, task, keypoints in rows:
      k = tasks.get_task(task).num_keypoints
      if np.shape(keypoints) != (k, 2) or not np.all(np.isfinite(keypoints)):
        raise errors.InputError(f'write_csv: {ref}: keypoints must be finite ({k}, 2), got '
                                f'{np.shape(keypoints)}')
      points = [json.dumps([round(float(x), 3), round(float(y), 3)]) for x, y in keypoints]
      writer.writerow([ref, task, REGRESSION, k] + points + [''] * (max_k - k))


def fair_split(records: Sequence[KeypointRecord], val_fraction: float = 0.15,
               seed: int = 42) -> tuple[list[KeypointRecord], list[KeypointRecord]]:
  """(train, val): a random `val_fraction` of the records held out, the card's "fair validation".

  The card states only "15 % split, seed 42"; this draws one permutation of all records with
  NumPy's default_rng(seed), so its validation samples are not the card's. Order is kept.
  """
  if not 0.0 < val_fraction < 1.0:
    raise errors.InputError(f'val_fraction must be in (0, 1), got {val_fraction}')
  num_val = int(round(len(records) * val_fraction))
  held = set(np.random.default_rng(seed).permutation(len(records))[:num_val].tolist())
  train = [r for i, r in enumerate(records) if i not in held]
  val = [r for i, r in enumerate(records) if i in held]
  return train, val
