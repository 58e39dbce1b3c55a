"""The official I-JEPA checkpoint layout <-> the variables of `sonichu_jax.experiments.ijepa`.

An I-JEPA training checkpoint (`src/train.py::save_checkpoint` of facebookresearch/ijepa) holds
'encoder', 'predictor' and 'target_encoder' state dicts, each with DDP's `module.` prefix. The
encoders use timm's names, which are the Flax names of `MaskedEncoder` under
`sonichu_jax.convert.torch_key`; the predictor's blocks are `predictor_blocks.{i}` (Flax
`blocks_{i}`), and its `predictor_pos_embed`, a frozen sin-cos table, is a constant here: on import
it must equal the table this code computes, and export writes it.
"""
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sonichu_jax import convert
from sonichu_jax.models import ijepa
from sonichu_jax.models import vit
from ultrasound_common import errors

ENTRIES = ('encoder', 'predictor', 'target_encoder')
_DDP = 'module.'
_BLOCKS = ('predictor_blocks.', 'blocks.')


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k.removeprefix(_DDP): np.asarray(v) for k, v in state_dict.items()}


def _predictor_state(state_dict: Mapping[str, np.ndarray], predictor: ijepa.Predictor,
                     source: str) -> dict[str, np.ndarray]:
  """The predictor's tensors under the Flax-derived names, its position table checked."""
  sd = dict(state_dict)
  if 'predictor_pos_embed' not in sd:
    raise errors.InputError(f'{source} [predictor]: no predictor_pos_embed')
  pos = sd.pop('predictor_pos_embed')
  want = vit.sincos_pos_embed(tuple(predictor.grid), predictor.predictor_dim)
  if pos.shape != want.shape or not np.allclose(pos, want, atol=1e-6):
    raise errors.InputError(f'{source} [predictor]: predictor_pos_embed {pos.shape} is not the '
                            f'fixed sin-cos table {want.shape} of the {predictor.grid} grid')
  return {(_BLOCKS[1] + k.removeprefix(_BLOCKS[0]) if k.startswith(_BLOCKS[0]) else k): v
          for k, v in sd.items()}


def from_ijepa(checkpoint: Mapping[str, Any], model: ijepa.IJepa, image_size: int, *,
               source: str = 'I-JEPA checkpoint') -> dict[str, Any]:
  """{'params': {'encoder', 'predictor'}, 'target': {'encoder'}} from the official layout, strict.

  Args:
    checkpoint: the saved dict with 'encoder', 'predictor' and 'target_encoder' state dicts (DDP
      prefixes optional), arrays in torch layout.
    model: the IJepa module whose shapes the tensors must have.
    image_size: the input side (gives the token grid of the encoder's position table).
    source: names the file in error messages.
  """
  missing = [k for k in ENTRIES if k not in checkpoint]
  if missing:
    raise errors.InputError(f'{source}: no {missing} entries; entries: {sorted(checkpoint)}')
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  grid = tuple(model.predictor.grid)
  n = grid[0] * grid[1]
  index = jax.ShapeDtypeStruct((1, n), np.int32)
  valid = jax.ShapeDtypeStruct((1, n), bool)
  targets = jax.ShapeDtypeStruct((1, 1, n), np.int32)
  target_valid = jax.ShapeDtypeStruct((1, 1, n), bool)
  template = jax.eval_shape(model.init, jax.random.key(0), images, index, valid, targets,
                            target_valid)['params']
  out = {}
  for entry, tree in (('encoder', 'encoder'), ('target_encoder', 'encoder'),
                      ('predictor', 'predictor')):
    sd = _strip(checkpoint[entry])
    if entry == 'predictor':
      sd = _predictor_state(sd, model.predictor, source)
    out[entry] = convert.import_variables(sd, {'params': template[tree]},
                                          source=f'{source} [{entry}]')['params']
  return {'params': {'encoder': out['encoder'], 'predictor': out['predictor']},
          'target': {'encoder': out['target_encoder']}}


def to_ijepa(variables: Mapping[str, Any], predictor: ijepa.Predictor) -> dict[str, Any]:
  """The official layout ({entry: state dict with `module.` prefixes}) of `variables`.

  `variables['target']['encoder']` is written as stored (see `Experiment.target_encoder` for the
  pending EMA update of a run's last step).
  """
  trees = {'encoder': variables['params']['encoder'],
           'predictor': variables['params']['predictor'],
           'target_encoder': variables['target']['encoder']}
  out = {}
  for entry, tree in trees.items():
    sd = convert.export_variables({'params': jax.device_get(tree)})
    if entry == 'predictor':
      sd = {(_BLOCKS[0] + k.removeprefix(_BLOCKS[1]) if k.startswith(_BLOCKS[1]) else k): v
            for k, v in sd.items()}
      sd['predictor_pos_embed'] = vit.sincos_pos_embed(tuple(predictor.grid),
                                                       predictor.predictor_dim)
    out[entry] = {_DDP + k: np.asarray(v) for k, v in sd.items()}
  return out
