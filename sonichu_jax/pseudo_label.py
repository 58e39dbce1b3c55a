r"""Pseudo-labels: a teacher checkpoint or an ensemble labels unlabelled images (stage 2).

    python -m sonichu_jax.pseudo_label --teachers=runs/r1 [--teachers=runs/r2 ...] \
        --images=data/unlabelled --out=data/pseudo_r1 [--max_spread=8] [--cap=FUGC=500 ...]

--images: a folder with one subfolder per task named as the task (`HC/`, `fetal_femur/`, ...)
holding image files (.png, .jpg, .jpeg, .bmp, .tif, .tiff; other files are ignored), or an FM_UIA
split folder (`csv_files/*.csv` naming the images; their points, if any, are ignored); --tasks
restricts it to some tasks. Every task labelled must be one the teachers were trained on.
--out: a new folder in the FM_UIA layout (`sonichu_jax/data/fmuia.py`), which a config mixes into
its training records with `config.data.pseudo_labels` (`sonichu_jax/data/datasets.py`):
  OUT/train/csv_files/pseudo_labels.csv  the kept images (absolute paths: the images are not
                                         copied) with the teachers' keypoints in image pixels
  OUT/spread.csv                         every image: its task, spread in pixels and whether kept
  OUT/pseudo_labels.json                 teachers (step directories, variable hashes), settings
                                         and counts per task
It is written into a temporary folder beside OUT and renamed when complete; OUT must not exist.

The label of an image is the teachers' coordinate-wise median (with the teachers' flip TTA unless
--notta; one teacher: its prediction). Its confidence is the ensemble spread
(`sonichu_jax.ensemble.spread`): per keypoint, the mean distance in image pixels from each teacher
to the median; an image's spread is the largest over its keypoints. --max_spread keeps the images
whose spread is at most that many pixels (it needs two or more teachers); --cap TASK=N then keeps
at most the N most confident images of a task. The teachers run as one vmapped program
(`sonichu_jax.ensemble`); images are read and preprocessed as for evaluation
(`sonichu_jax.data.pipeline.eval_batches`, `sonichu_jax.preprocess`).
"""
import csv
import json
import os
import shutil
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from sonichu_jax import ensemble
from sonichu_jax import tasks
from sonichu_jax.data import fmuia
from ultrasound_common import errors

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
CSV_NAME = 'pseudo_labels.csv'
SPREAD_NAME = 'spread.csv'
MANIFEST_NAME = 'pseudo_labels.json'


def parse_caps(items: list[str]) -> dict[str, int]:
  """['FUGC=500', ...] -> {'FUGC': 500}; InputError naming --cap for a bad item."""
  caps = {}
  for item in items:
    name, sep, text = item.partition('=')
    try:
      task = tasks.get_task(name).name
      count = int(text)
    except ValueError as e:
      raise errors.InputError(f'--cap={item}: expected TASK=N with a task name and N >= 0 '
                              f'({e})') from None
    if not sep or count < 0 or task in caps:
      raise errors.InputError(f'--cap={item}: expected TASK=N, N >= 0, once per task')
    caps[task] = count
  return caps


def unlabelled_records(folder: str,
                       task_names: list[str] | None = None) -> list[fmuia.KeypointRecord]:
  """The images of `folder` (module docstring) as records with no visible keypoints.

  Args:
    folder: a folder with a subfolder per task, or an FM_UIA split folder.
    task_names: only these tasks' images; None: all.
  """
  wanted = None if task_names is None else {tasks.get_task(t).name for t in task_names}
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise errors.MissingFileError(f'--images={folder}: no such folder')
  if os.path.isdir(os.path.join(folder, fmuia.CSV_DIR)):
    records = fmuia.load_split(folder, wanted)
  else:
    records = []
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if name.startswith('.') or not os.path.isdir(path):
        continue
      try:
        task = tasks.get_task(name)
      except ValueError as e:
        raise errors.InputError(
            f'--images: subfolder {path} is not named as a task ({e})') from None
      if wanted is not None and task.name not in wanted:
        continue
      for file in sorted(os.listdir(path)):
        if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
          image = os.path.join(path, file)
          try:
            image_hw = fmuia.image_size(image)
          except OSError as e:
            raise errors.InputError(f'{image}: cannot read the image ({e})') from e
          k = task.num_keypoints
          records.append(fmuia.KeypointRecord(image, image, task.name, np.zeros((k, 2)),
                                              np.zeros(k, bool), image_hw, image))
  if not records:
    raise errors.InputError(
        f'--images={folder}: no images to label{"" if wanted is None else f" of {sorted(wanted)}"}'
        ' (expected a subfolder per task, e.g. '
        f'{os.path.join(folder, "HC")}/*.png, or an FM_UIA split folder with '
        f'{fmuia.CSV_DIR}/*.csv)')
  return records


def select(spread_px: np.ndarray, max_spread: float | None, cap: int | None) -> np.ndarray:
  """Indices (ascending) of the images kept: spread <= max_spread, then the `cap` lowest."""
  keep = np.arange(len(spread_px))
  if max_spread is not None:
    keep = keep[spread_px <= max_spread]
  if cap is not None and len(keep) > cap:
    keep = np.sort(keep[np.argsort(spread_px[keep], kind='stable')[:cap]])
  return keep


def pseudo_label(teachers: list[str], images: str, out: str, *, checkpoint: str = 'best',
                 max_spread: float | None = None, caps: dict[str, int] | None = None,
                 task_names: list[str] | None = None, tta: bool | None = None,
                 dtype: str | None = None, batch_size: int = 16) -> dict[str, Any]:
  """Labels `images` with the teachers and writes `out` (module docstring).

  Args:
    teachers: run folders or step directories of keypoint runs of one architecture.
    images: the unlabelled images' folder.
    out: the folder to create.
    checkpoint: the teachers' checkpoint ('best', 'latest' or a step number).
    max_spread: confidence threshold in pixels; None keeps every image.
    caps: {task: at most this many images}.
    task_names: label only these tasks' images; None: every task in `images`.
    tta: flip TTA; None: the first teacher's `eval_tta`.
    dtype: the teachers' compute dtype; None: their own.
    batch_size: images per teacher batch.

  Returns:
    The content of pseudo_labels.json.
  """
  caps = dict(caps or {})
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out):
    raise errors.ExistsError(f'--out={out} exists; pseudo-labels go into a new folder')
  if max_spread is not None and (len(teachers) < 2 or max_spread < 0):
    raise errors.InputError(f'--max_spread={max_spread}: a spread threshold needs two or more '
                            f'--teachers (got {len(teachers)}) and a value >= 0')
  if batch_size < 1:
    raise errors.InputError(f'--batch_size={batch_size}: must be >= 1')
  try:
    task_names = None if task_names is None else [tasks.get_task(t).name for t in task_names]
  except ValueError as e:
    raise errors.InputError(f'--tasks: {e}') from None
  records = unlabelled_records(images, task_names)
  members = ensemble.load_members(teachers, checkpoint, dtype)
  trained = ensemble.task_set(members.config)
  unknown = sorted({r.task for r in records} - set(trained))
  if unknown:
    raise errors.InputError(f'--images={images}: images of tasks {unknown}, which the teachers '
                            f'({members.paths[0]}, ...) were not trained on: {list(trained)}')
  tta = bool(members.config.eval_tta) if tta is None else tta
  predicted = ensemble.predict_records(members, records, batch_size=batch_size, tta=tta)

  rows, spread_rows, counts = [], [], {}
  for task, (preds, task_records) in sorted(predicted.items()):
    labels = np.median(preds, axis=0)  # (n, K, 2) pixels.
    spread_px = np.max(np.asarray(ensemble.spread(preds)), axis=-1)  # Pixels already.
    keep = select(spread_px, max_spread, caps.get(task))
    kept = np.zeros(len(task_records), bool)
    kept[keep] = True
    rows += [(task_records[i].image_path, task, labels[i]) for i in keep]
    spread_rows += [(r.image_path, task, f'{s:.4f}', int(k))
                    for r, s, k in zip(task_records, spread_px, kept)]
    counts[task] = {'images': len(task_records), 'kept': int(kept.sum())}
  manifest = {'teachers': list(members.paths), 'teacher_hashes': list(members.hashes),
              'images': os.path.abspath(images), 'max_spread_px': max_spread, 'caps': caps,
              'tta': tta, 'compute_dtype': members.config.compute_dtype, 'counts': counts}

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', dir=parent)
  try:
    os.makedirs(os.path.join(tmp, 'train', fmuia.CSV_DIR))
    fmuia.write_csv(os.path.join(tmp, 'train', fmuia.CSV_DIR, CSV_NAME), rows)
    with open(os.path.join(tmp, SPREAD_NAME), 'w', newline='', encoding='utf-8') as f:
      writer = csv.writer(f)
      writer.writerow([fmuia.IMAGE_PATH, fmuia.TASK_ID, 'spread_px', 'kept'])
      writer.writerows(spread_rows)
    with open(os.path.join(tmp, MANIFEST_NAME), 'w') as f:
      json.dump(manifest, f, indent=2)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program)."""
  flags.DEFINE_multi_string('teachers', [], 'A teacher run folder or checkpoint step directory; '
                            'repeat it for an ensemble.')
  flags.DEFINE_string('checkpoint', 'best', "The teachers' checkpoint: 'best', 'latest' or a "
                      'step number.')
  flags.DEFINE_string('images', None, 'Folder of unlabelled images: a subfolder per task, or an '
                      'FM_UIA split folder.')
  flags.DEFINE_string('out', None, 'New output folder (FM_UIA layout).')
  flags.DEFINE_float('max_spread', None, 'Keep images whose ensemble spread is at most this many '
                     'pixels (two or more teachers).')
  flags.DEFINE_list('tasks', None, 'Label only these tasks (comma-separated; default: every '
                    'task in --images).')
  flags.DEFINE_multi_string('cap', [], 'TASK=N: keep at most the N most confident images of '
                            'TASK (repeatable).')
  flags.DEFINE_bool('tta', None, "Flip TTA (default: the teachers' eval_tta).")
  flags.DEFINE_string('dtype', None, "The teachers' compute dtype, e.g. bfloat16 (default: "
                      'their own).')
  flags.DEFINE_integer('batch_size', 16, 'Images per teacher batch.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.teachers or not f.images or not f.out:
    raise app.UsageError('--teachers, --images and --out are required')
  logging.set_verbosity(logging.WARNING)  # Orbax's per-checkpoint INFO lines say nothing here.
  manifest = pseudo_label(f.teachers, f.images, f.out, checkpoint=f.checkpoint,
                          max_spread=f.max_spread, caps=parse_caps(f.cap), task_names=f.tasks,
                          tta=f.tta, dtype=f.dtype, batch_size=f.batch_size)
  lines = [f'  {task:12s} {c["kept"]:6d} of {c["images"]:6d}'
           for task, c in manifest['counts'].items()]
  print('pseudo-labelled images kept per task:\n' + '\n'.join(lines) + f'\nWrote {f.out}')


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'sonichu_jax.pseudo_label')
