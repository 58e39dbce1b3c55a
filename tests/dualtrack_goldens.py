"""DualTrack parity goldens: seeded weights and inputs, and the fixture file format.

Shared by `scripts/record_dualtrack_goldens.py` (which runs the original PyTorch code) and
`tests/test_dualtrack_parity.py` (which runs ours without torch). NumPy only, so that it imports in
both environments.

A golden is `tests/fixtures/dualtrack/<name>.npz` with
  meta: a 0-d JSON string: block, description, the original builder call, the upstream commit,
    library versions, the state dict as [[torch key, shape], ...] in the original's key order with
    its weight seed, and every random input as {shape, dist, seed}; each generated tensor group has
    a SHA-256 so that a change of NumPy's random streams is reported as such, not as a mismatch;
  input_<name>: inputs stored as they are (integer indices);
  output_<name>: the original's outputs in the original's layout (channels-first, float32).
Weights are never stored: `random_state_dict` regenerates them from the key list and the seed.
"""
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from ultrasound_common import files

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'dualtrack')

KeysAndShapes = Sequence[tuple[str, Sequence[int]]]


def _weight(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """One state-dict tensor with a scale that keeps activations O(1) through the block.

  Positional tables are drawn large on purpose (the same scale as q and k), so that an off-by-one
  in a relative-distance or absolute-index lookup changes the outputs far beyond the tolerance.
  """
  def normal(std):
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

  name = key.rsplit('.', 1)[-1]
  if name == 'num_batches_tracked':
    return np.zeros(shape, np.int64)
  if name == 'running_mean':
    return normal(0.1)
  if name == 'running_var':
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)
  if key.endswith('distance_embedding.weight'):  # (2P - 1, head_dim)
    return normal(1.0 / np.sqrt(shape[1]))
  if name in ('cls_token', 'position_embeddings') or key.endswith('pos_emb.weight'):
    return normal(0.5)
  if len(shape) in (4, 5):  # conv (O, I, k...): He normal
    return normal(np.sqrt(2.0 / np.prod(shape[1:])))
  if len(shape) == 2:  # Linear (out, in)
    return normal(1.0 / np.sqrt(shape[1]))
  if len(shape) == 1 and name == 'weight':  # LayerNorm / BatchNorm scale
    return (1.0 + normal(0.1)).astype(np.float32)
  if len(shape) == 1 and (name == 'bias' or name.startswith('bias_')):  # also torch LSTM biases
    return normal(0.1)
  raise ValueError(f'random_state_dict: no rule for key {key!r} of shape {shape}')


def random_state_dict(keys_and_shapes: KeysAndShapes, seed: int) -> dict[str, np.ndarray]:
  """Seeded random weights for a PyTorch state dict (torch key names and shapes, float32).

  Tensors are drawn in the given key order from one `np.random.default_rng(seed)`; the scale of
  each follows its key (conv He normal, Linear 1/sqrt(fan_in), norm scales 1 +- 0.1, small biases
  and running means, running variances in [0.5, 2], num_batches_tracked 0).
  """
  rng = np.random.default_rng(seed)
  return {key: _weight(key, tuple(int(s) for s in shape), rng) for key, shape in keys_and_shapes}


def random_input(shape: Sequence[int], dist: str, seed: int) -> np.ndarray:
  """A seeded float32 input: 'uniform' in [0, 1) (images, post-ReLU maps) or 'normal'."""
  rng = np.random.default_rng(seed)
  if dist == 'uniform':
    return rng.random(tuple(shape), dtype=np.float32)
  if dist == 'normal':
    return rng.standard_normal(tuple(shape), dtype=np.float32)
  raise ValueError(f'random_input: dist must be uniform or normal, got {dist!r}')


def sha256(arrays: Sequence[np.ndarray]) -> str:
  """SHA-256 over the bytes of the arrays, in order (C order)."""
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Golden:
  """One recorded golden: metadata, stored inputs and the original's outputs."""
  path: str
  meta: dict
  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]

  def state_dict(self) -> dict[str, np.ndarray]:
    """The recorded block's weights in the original layout (torch keys and shapes)."""
    weights = self.meta['weights']
    state = random_state_dict(weights['keys_and_shapes'], weights['seed'])
    if sha256(list(state.values())) != weights['sha256']:
      raise ValueError(f'{self.path}: regenerated weights differ from the recorded ones (has '
                       "NumPy's random stream changed?); re-record with "
                       'scripts/record_dualtrack_goldens.py')
    return state

  def random_input(self, name: str) -> np.ndarray:
    """A generated input by name, checked against its recorded SHA-256."""
    spec = self.meta['random_inputs'][name]
    array = random_input(spec['shape'], spec['dist'], spec['seed'])
    if sha256([array]) != spec['sha256']:
      raise ValueError(f'{self.path}: regenerated input {name!r} differs from the recorded one')
    return array


def load_golden(name: str, directory: str = FIXTURE_DIR) -> Golden:
  """Reads `<directory>/<name>.npz`."""
  path = os.path.join(directory, name + '.npz')
  with np.load(path, allow_pickle=False) as data:
    meta = json.loads(str(data['meta']))
    inputs = {k[len('input_'):]: data[k] for k in data.files if k.startswith('input_')}
    outputs = {k[len('output_'):]: data[k] for k in data.files if k.startswith('output_')}
  return Golden(path, meta, inputs, outputs)


def save_golden(path: str, meta: dict, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray]) -> None:
  """Writes a golden (compressed npz) atomically."""
  arrays = {'meta': np.array(json.dumps(meta))}
  arrays.update({'input_' + k: v for k, v in inputs.items()})
  arrays.update({'output_' + k: np.asarray(v, np.float32) for k, v in outputs.items()})
  with files.atomic_output(path) as tmp, open(tmp, 'wb') as f:
    np.savez_compressed(f, **arrays)
