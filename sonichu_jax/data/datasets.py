"""Where a SONICHU config's keypoint records come from: an FM_UIA folder or synthetic images.

`config.data.dataset` is the path of an FM_UIA data folder holding `train/` and `val/` (`fmuia.py`),
or 'synthetic': then the images that `config.data.synthetic` describes (`num_train`, `num_val` per
task, `seed`, optional `generator` fields of SyntheticConfig) are generated once into a cache folder
(`synthetic.cache_dir`, else $SONICHU_CACHE, else ~/.cache/sonichu_jax) that later runs reuse, so a
fresh clone trains with no download. With `config.data.fair_split` the validation records are the
card's "fair validation" (15 %, seed 42) held out of `train/` (for data whose `val/` has no
labels), and the training records the rest. `config.data.tasks` (optional) restricts the tasks.

`config.data.pseudo_labels` (optional): folders written by `sonichu_jax.pseudo_label` (the FM_UIA
layout, records in `train/`) whose records join the TRAINING records only, so that validation
stays on original labels (the card's "fair validation"). A pseudo-labelled image that is also a
validation image is refused: it would leak the validation set into training.
"""
import os

import ml_collections

from sonichu_jax.data import fmuia
from sonichu_jax.data import synthetic
from ultrasound_common import errors

SYNTHETIC = 'synthetic'
SPLITS = ('train', 'val')
CACHE_ENV = 'SONICHU_CACHE'
DEFAULT_CACHE = '~/.cache/sonichu_jax'


def _synthetic_root(spec: ml_collections.ConfigDict) -> str:
  """Generates (once) the synthetic dataset that `spec` describes; returns its folder."""
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in spec.get('generator', {}).items()}
  try:
    config = synthetic.SyntheticConfig(**overrides)
  except TypeError as e:
    raise errors.InputError(f'config.data.synthetic.generator: {e}') from e
  cache = spec.get('cache_dir') or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
  return synthetic.ensure_dataset(os.path.join(os.path.expanduser(cache), 'synthetic'),
                                  config=config, num_train=spec.num_train,
                                  num_val=spec.num_val, seed=spec.seed)


def load_split(data: ml_collections.ConfigDict, split: str) -> list[fmuia.KeypointRecord]:
  """The records of `split` ('train' or 'val') of `config.data`."""
  if split not in SPLITS:
    raise errors.InputError(f'split must be one of {SPLITS}, got {split!r}')
  root = _synthetic_root(data.synthetic) if data.dataset == SYNTHETIC else data.dataset
  task_names = data.get('tasks') or None

  def read(name: str) -> list[fmuia.KeypointRecord]:
    return fmuia.load_split(os.path.join(root, name), task_names)

  if data.get('fair_split', False):
    train, val = fmuia.fair_split(read('train'))
  else:
    train, val = read('train'), read('val')
  if split == 'val':
    return val
  return train + _pseudo_labelled(list(data.get('pseudo_labels') or ()), task_names, val)


def _pseudo_labelled(folders: list[str], task_names, val: list[fmuia.KeypointRecord]
                     ) -> list[fmuia.KeypointRecord]:
  """The records of the `config.data.pseudo_labels` folders; none may be a validation image."""
  held_out = {(r.task, os.path.realpath(r.image_path)): r.source for r in val}
  records = []
  for i, folder in enumerate(folders):
    if not os.path.isdir(folder):
      raise errors.MissingFileError(f'config.data.pseudo_labels[{i}]: {folder}: no such folder')
    for record in fmuia.load_split(os.path.join(folder, 'train'), task_names):
      leak = held_out.get((record.task, os.path.realpath(record.image_path)))
      if leak:
        raise errors.InputError(
            f'config.data.pseudo_labels[{i}]: {record.source}: image {record.image_path} is a '
            f'validation image ({leak}); pseudo-labelling it would leak validation into training')
      records.append(record)
  return records
