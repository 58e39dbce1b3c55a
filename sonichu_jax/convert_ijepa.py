"""The official I-JEPA checkpoint layout <-> the variables of `sonichu_jax.experiments.ijepa`.

An I-JEPA training checkpoint (`src/train.py::save_checkpoint` of facebookresearch/ijepa) holds
'encoder', 'predictor' and 'target_encoder' state dicts, each with DDP's `module.` prefix. The
encoders use timm's names, which are the Flax names of `MaskedEncoder` under
`sonichu_jax.convert.torch_key`; the predictor's blocks are `predictor_blocks.{i}` (Flax
`blocks_{i}`), and its `predictor_pos_embed`, a frozen sin-cos table, is a constant here: on import
it must equal the table this code computes, and export writes it.

`launch.convert --model=ijepa` (sonichu_jax/interface.py) reads such a file at any size the
official code builds (`architecture` reads it from the tensors; the head count, which no tensor
shows, from the official model table) and writes one back (`training_checkpoint`): the three
networks plus the official entries 'opt', 'scaler', 'epoch', 'loss', 'batch_size', 'world_size'
and 'lr', so that the original's `load_checkpoint` resumes from it.
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
# The official encoders' head counts by width (src/models/vision_transformer.py: vit_tiny to
# vit_giant); the predictor uses the encoder's.
OFFICIAL_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
# torch.cuda.amp.GradScaler's initial state_dict(): the original builds one when use_bfloat16.
_GRAD_SCALER = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                'growth_interval': 2000, '_growth_tracker': 0}


# The original modules' registration order (their state dicts' key order), per name part.
_RANK = {'pos_embed': 0, 'mask_token': 0, 'predictor_pos_embed': 1, 'patch_embed': 2,
         'predictor_embed': 2, 'blocks': 3, 'predictor_blocks': 3, 'norm': 4, 'predictor_norm': 4,
         'predictor_proj': 5, 'norm1': 0, 'attn': 1, 'norm2': 2, 'mlp': 3, 'qkv': 0, 'proj': 1,
         'fc1': 0, 'fc2': 1, 'weight': 0, 'bias': 1}


def _official_rank(key: str) -> tuple[int, ...]:
  return tuple(int(part) if part.isdigit() else _RANK[part] for part in key.split('.'))


def split_entries(state_dict: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
  """{'encoder': ..., 'predictor': ..., 'target_encoder': ...} of a flat '<entry>.<key>' dict (as
  `launch.torch_io.read_state_dict` gives a checkpoint that nests state dicts)."""
  out = {entry: {} for entry in ENTRIES}
  for key, value in state_dict.items():
    entry, _, name = key.partition('.')
    if entry not in out:
      raise errors.InputError(f'{source}: {key!r} is in none of the I-JEPA entries {ENTRIES}')
    out[entry][name] = value
  missing = [entry for entry, sd in out.items() if not sd]
  if missing:
    raise errors.InputError(f'{source}: not an I-JEPA training checkpoint: no {missing} state '
                            'dicts')
  return out


def architecture(checkpoint: Mapping[str, Mapping[str, Any]], source: str,
                 num_heads: int) -> dict[str, Any]:
  """The model, predictor and input size of an official checkpoint, read from its tensors.

  The head count is in no tensor: the official encoders' (`OFFICIAL_HEADS`) for their widths,
  else `num_heads` (which must divide the width).

  Returns:
    {'model': patch_size, embed_dim, depth, num_heads, mlp_ratio; 'predictor': dim, depth,
    num_heads, mlp_ratio; 'image_size'}.
  """
  encoder = _strip(checkpoint['encoder'])
  predictor = _strip(checkpoint['predictor'])

  def shape(sd, key, entry):
    if key not in sd:
      raise errors.InputError(f'{source} [{entry}]: no {key}; not an I-JEPA ViT')
    return sd[key].shape

  width, _, patch, _ = shape(encoder, 'patch_embed.proj.weight', 'encoder')
  tokens = shape(encoder, 'pos_embed', 'encoder')[1]
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise errors.InputError(f'{source} [encoder]: pos_embed has {tokens} tokens, not a square grid')
  heads = OFFICIAL_HEADS.get(width, num_heads)
  if width % heads:
    raise errors.InputError(f'{source} [encoder]: width {width} is none of the official encoders '
                            f'({sorted(OFFICIAL_HEADS)}), and config.model.num_heads={heads} '
                            'does not divide it (no tensor shows the head count)')

  def blocks(sd, prefix):
    return len({k.split('.')[1] for k in sd if k.startswith(prefix)})

  hidden = shape(encoder, 'blocks.0.mlp.fc1.weight', 'encoder')[0]
  pred_dim = shape(predictor, 'predictor_embed.weight', 'predictor')[0]
  pred_hidden = shape(predictor, 'predictor_blocks.0.mlp.fc1.weight', 'predictor')[0]
  return {'model': dict(patch_size=patch, embed_dim=width, depth=blocks(encoder, 'blocks.'),
                        num_heads=heads, mlp_ratio=hidden / width),
          'predictor': dict(dim=pred_dim, depth=blocks(predictor, 'predictor_blocks.'),
                            num_heads=heads, mlp_ratio=pred_hidden / pred_dim),
          'image_size': grid * patch}


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
    out[entry] = {_DDP + k: np.asarray(sd[k]) for k in sorted(sd, key=_official_rank)}
  return out


def _adamw_groups(networks: Mapping[str, Mapping[str, np.ndarray]], lr: float,
                  weight_decay: float, betas: tuple[float, float], eps: float
                  ) -> list[dict[str, Any]]:
  """The original's four AdamW param groups (`helper.init_opt`), as `state_dict()` numbers them.

  Groups: encoder weights, predictor weights, then the encoder's and the predictor's biases and
  1-D tensors (no decay, 'WD_exclude'). Parameters are numbered in group order, each group in its
  module's `named_parameters()` order (the state dict's: the networks have no buffers).
  """
  groups, first = [], 0
  for exclude in (False, True):
    for entry in ('encoder', 'predictor'):
      count = sum((('bias' in k) or np.ndim(v) == 1) == exclude for k, v in networks[entry].items())
      group = {'lr': lr, 'betas': betas, 'eps': eps, 'weight_decay': 0 if exclude else weight_decay,
               'amsgrad': False, 'maximize': False, 'foreach': None, 'capturable': False,
               'differentiable': False, 'fused': None, 'params': list(range(first, first + count))}
      if exclude:
        group['WD_exclude'] = True
      groups.append(group)
      first += count
  return groups


def training_checkpoint(variables: Mapping[str, Any], predictor: ijepa.Predictor, *,
                        epoch: int, lr: float, weight_decay: float, betas: tuple[float, float],
                        eps: float, batch_size: int, bf16: bool) -> dict[str, Any]:
  """The whole dict of the original's `save_checkpoint` (src/train.py) for `variables`.

  Args:
    variables: {'params': {'encoder', 'predictor'}, 'target': {'encoder', ...}}, the target
      encoder as the original holds it after the last step (no pending EMA update).
    predictor: the Predictor module (its grid and width give the position table).
    epoch: completed epochs (the original's resume skips epoch * iterations of its schedules).
    lr, weight_decay, betas, eps: the optimiser's hyperparameters, stored in its param groups.
    batch_size: the batch per process; 'world_size' is 1 (the global batch on one process).
    bf16: the original then builds a GradScaler and loads its state; a fresh one's is written.

  'opt' holds the four param groups and no moments (a run's variables carry none: the
  original's AdamW then starts them at zero, as at a fresh start); 'loss' is None (the epoch's
  average loss, which a run's variables do not hold).
  """
  out = to_ijepa(variables, predictor)
  out['opt'] = {'state': {}, 'param_groups': _adamw_groups(out, lr, weight_decay, betas, eps)}
  out.update(scaler=dict(_GRAD_SCALER) if bf16 else None, epoch=int(epoch), loss=None,
             batch_size=int(batch_size), world_size=1, lr=float(lr))
  return out
