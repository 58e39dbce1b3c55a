"""Where a SONICHU config's keypoint records come from: an FM_UIA folder or synthetic images.

`config.data.dataset` is the path of an FM_UIA data folder holding `train/` and `val/` (`fmuia.py`),
or 'synthetic': then the images that `config.data.synthetic` describes (`num_train`, `num_val` per
task, `seed`, optional `generator` fields of SyntheticConfig) are generated once into a cache folder
(`synthetic.cache_dir`, else $SONICHU_CACHE, else ~/.cache/sonichu_jax) that later runs reuse, so a
fresh clone trains with no download. With `config.data.fair_split` the validation records are the
card's "fair validation" (15 %, seed 42) held out of `train/` (for data whose `val/` has no
labels), and the training records the rest. `config.data.tasks` (optional) restricts the tasks.
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
  if data.get('fair_split', False):
    train, val = fmuia.fair_split(fmuia.load_split(os.path.join(root, 'train'), task_names))
    return train if split == 'train' else val
  return fmuia.load_split(os.path.join(root, split), task_names)
