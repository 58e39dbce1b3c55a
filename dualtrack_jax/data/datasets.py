"""Where a config's sweeps come from: a registered dataset, a sweep CSV, or simulated sweeps.

`config.data.dataset` is a name in the dataset registry (see `registry.py`), a path to a sweep
CSV, or 'synthetic': then the simulator generates the sweeps that `config.data.synthetic`
describes once into a cache folder (`synthetic.cache_dir`, else $DUALTRACK_CACHE, else
~/.cache/dualtrack_jax) that later runs reuse, so a fresh clone trains with no download.
"""
import os

import ml_collections

from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator

SYNTHETIC = 'synthetic'
CACHE_ENV = 'DUALTRACK_CACHE'
DEFAULT_CACHE = '~/.cache/dualtrack_jax'


def _synthetic_csv(synthetic: ml_collections.ConfigDict) -> str:
  """Generates (once) the simulated dataset that `synthetic` describes; returns its CSV."""
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in synthetic.get('simulator', {}).items()}
  try:
    sim_config = simulator.SimulatorConfig(**overrides)
  except TypeError as e:
    raise registry.DatasetError(f'config.data.synthetic.simulator: {e}') from e
  cache = (synthetic.get('cache_dir') or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
  return simulator.ensure_dataset(
      os.path.join(os.path.expanduser(cache), 'synthetic'), config=sim_config,
      num_train=synthetic.num_train, num_val=synthetic.num_val,
      num_test=synthetic.get('num_test', 0), seed=synthetic.seed)


def load_split(data: ml_collections.ConfigDict, split: str) -> list[registry.SweepRecord]:
  """The sweeps of one split of `config.data.dataset` (generating simulated ones if needed)."""
  if data.dataset == SYNTHETIC:
    return registry.read_sweep_csv(_synthetic_csv(data.synthetic), split)
  return registry.load_sweeps(data.dataset, split, registry=data.get('registry') or None)
