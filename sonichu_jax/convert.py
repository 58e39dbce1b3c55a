"""PyTorch weights <-> SONICHU Flax variables: timm ViT, I-JEPA, mmpose ViTPose, SONICHU files.

Every import is strict: each Flax leaf needs its tensor, each tensor of the (selected part of the)
file must be used, and each shape must match; otherwise one ValueError names the source, the keys
and the shapes. Tensors dropped on purpose are listed where they are dropped (the class token and
classifier of timm, the BatchNorm counters `num_batches_tracked`).

Names. Flax paths are the torch names with `/` for `.` (`blocks_3/attn/qkv/kernel` is
`blocks.3.attn.qkv.weight`; `deconv_layers_0` is `deconv_layers.0`, `heads_HC` is `heads.HC`),
`kernel` and `scale` are `weight`, and the BatchNorm statistics `mean`/`var` are
`running_mean`/`running_var`. Layouts: Linear (O, I) -> (I, O); Conv2d (O, I, kh, kw) and
ConvTranspose2d (I, O, kh, kw) both -> permutation (2, 3, 1, 0), giving Flax's (kh, kw, I, O) and
transpose-kernel (kh, kw, O, I) layouts.

The SONICHU file layout (our convention; the published file's names are unknown: docs/sonichu.md,
section "Checkpoint layout") is the backbone under `backbone.` with timm names and each head under
`heads.{task}.` with mmpose's `TopdownHeatmapSimpleHead` names, as `to_sonichu` writes it.

Files (`.safetensors`, `torch.save`) are read and written by launch/torch_io.py, without torch;
this module works on in-memory state dicts.
"""
from collections.abc import Mapping
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sonichu_jax.models.vit import VisionTransformer
from ultrasound_common import errors

# ----------------------------------------------------------------------------------------------
# Names, layouts and the strict tree import.

_INDEXED = re.compile(r'^(blocks|deconv_layers)_(\d+)$')
_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The torch name of the Flax leaf `path` (module names, then the leaf name) in `collection`."""
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    if m:
      parts += [m[1], m[2]]
    elif name.startswith('heads_'):
      parts += ['heads', name.removeprefix('heads_')]
    else:
      parts.append(name)
  parts.append(_LEAF_NAMES.get((collection, path[-1]), path[-1]))
  return '.'.join(parts)


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  if value.ndim == 4:  # Conv (O, I, kh, kw) and ConvTranspose (I, O, kh, kw).
    return value.transpose(2, 3, 1, 0)
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def import_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
                     prefix: str = '', source: str = 'state dict') -> dict[str, Any]:
  """Builds a Flax variables tree shaped like `template` from torch-named tensors, strictly.

  Args:
    state_dict: torch names (after `prefix`) -> arrays in torch layout.
    template: {collection: tree} whose leaves have `.shape` and `.dtype` (e.g. from jax.eval_shape).
    prefix: prepended to every torch name looked up.
    source: names the file or part in error messages.

  Returns:
    {collection: tree} of NumPy arrays in the template's dtypes.

  Raises:
    ValueError: missing tensors, unused tensors or wrong shapes, all listed.
  """
  flat = {(col, path): leaf for col, tree in template.items()
          for path, leaf in flax.traverse_util.flatten_dict(tree).items()}
  keys = {prefix + torch_key(col, path): (col, path) for col, path in flat}
  bn_counters = {k.rsplit('.', 1)[0] + '.num_batches_tracked' for k in keys
                 if k.endswith('.running_mean')}
  missing = sorted(k for k in keys if k not in state_dict)
  # num_batches_tracked only matters to torch's momentum=None running average, which ViTPose
  # does not use: dropped.
  unused = sorted(k for k in state_dict if k not in keys and k not in bn_counters)
  wrong = []
  out = {col: {} for col in template}
  for key, (col, path) in keys.items():
    if key in missing:
      continue
    value = _to_flax(np.asarray(state_dict[key]), path[-1])
    want = flat[col, path]
    if value.shape != tuple(want.shape):
      wrong.append(f'{key}: {tuple(np.shape(state_dict[key]))} (as Flax {value.shape}), expected '
                   f'Flax {"/".join(path)} {tuple(want.shape)}')
      continue
    out[col][path] = value.astype(want.dtype)
  problems = []
  if missing:
    problems.append(f'missing {len(missing)} tensors: {", ".join(missing)}')
  if unused:
    problems.append(f'{len(unused)} tensors would be unused: {", ".join(unused)}')
  if wrong:
    problems.append(f'{len(wrong)} wrong shapes: {"; ".join(wrong)}')
  if problems:
    raise errors.InputError(f'{source}: ' + '. '.join(problems))
  return {col: flax.traverse_util.unflatten_dict(tree) for col, tree in out.items()}


def export_variables(variables: Mapping[str, Any], *, prefix: str = '') -> dict[str, np.ndarray]:
  """Flax variables -> torch-named tensors in torch layout.

  BatchNorms get a zero `num_batches_tracked`, so that torch's strict `load_state_dict` accepts
  the result.
  """
  out = {}
  for col in ('params', 'batch_stats'):
    for path, value in flax.traverse_util.flatten_dict(variables.get(col, {})).items():
      key = prefix + torch_key(col, path)
      out[key] = _to_torch(np.asarray(value), path[-1])  # A view; writers copy.
      if key.endswith('.running_var'):
        out[key.removesuffix('running_var') + 'num_batches_tracked'] = np.array(0, np.int64)
  return out


# ----------------------------------------------------------------------------------------------
# Position tables.

def _aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of torch's `interpolate(mode='bicubic', antialias=True)` along one axis.

  That is PIL's separable filter: Keys cubic with a = -0.5, support 2 (stretched by the scale when
  shrinking), sampled at pixel centres, truncated at the borders and renormalised.
  """
  def cubic(x):
    x = np.abs(x)
    a = -0.5
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

  scale = in_size / out_size
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  mat = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    w = cubic((np.arange(lo, hi) - centre + 0.5) / stretch)
    mat[i, lo:hi] = w / w.sum()
  return mat


def resample_pos_embed(pos_embed: np.ndarray, src_grid: tuple[int, int],
                       dst_grid: tuple[int, int]) -> np.ndarray:
  """Resizes a (1, gh * gw, D) position table to another grid as timm's `resample_abs_pos_embed`
  (bicubic with antialiasing); float64 arithmetic, float32 result."""
  if tuple(src_grid) == tuple(dst_grid):
    return pos_embed
  d = pos_embed.shape[-1]
  grid = np.asarray(pos_embed, np.float64).reshape(*src_grid, d)
  rows = _aa_bicubic_matrix(src_grid[0], dst_grid[0])
  cols = _aa_bicubic_matrix(src_grid[1], dst_grid[1])
  out = np.einsum('ah,hwd,bw->abd', rows, grid, cols)
  return out.reshape(1, dst_grid[0] * dst_grid[1], d).astype(np.float32)


def _source_grid(num: int, dst_grid: tuple[int, int], src_grid, source: str) -> tuple[int, int]:
  """The grid of a table with `num` patch rows: given, equal to the target's, or square."""
  if src_grid is not None:
    if src_grid[0] * src_grid[1] != num:
      raise errors.InputError(
          f'{source}: pos_embed has {num} patch rows, not source grid {src_grid}')
    return tuple(src_grid)
  if num == dst_grid[0] * dst_grid[1]:
    return tuple(dst_grid)
  side = int(round(num ** 0.5))
  if side * side != num:
    raise errors.InputError(
        f'{source}: pos_embed has {num} patch rows, which is neither the target grid '
        f'{tuple(dst_grid)} nor square; pass its source grid')
  return side, side


# ----------------------------------------------------------------------------------------------
# Backbones and heads from the original formats.

def _strict_backbone(state_dict: Mapping[str, np.ndarray], grid, mlp_ratio: float,
                     source: str) -> dict[str, Any]:
  """Imports timm-named backbone tensors; width, depth and patch size come from the tensors."""
  for key in ('patch_embed.proj.weight', 'pos_embed'):
    if key not in state_dict:
      raise errors.InputError(f'{source}: no {key!r}; keys start with {sorted(state_dict)[:8]}')
  d, _, p, _ = state_dict['patch_embed.proj.weight'].shape
  depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
  # Shapes only (num_heads and the patch padding do not change them).
  vit = VisionTransformer(patch_size=p, embed_dim=d, depth=depth, num_heads=1, mlp_ratio=mlp_ratio)
  images = jax.ShapeDtypeStruct((1, grid[0] * p, grid[1] * p, 3), jnp.float32)
  template = jax.eval_shape(vit.init, jax.random.key(0), images)
  return import_variables(state_dict, {'params': template['params']}, source=source)['params']


def backbone_from_timm(state_dict: Mapping[str, np.ndarray], grid: tuple[int, int] = (16, 16), *,
                       src_grid: tuple[int, int] | None = None, mlp_ratio: float = 4.0,
                       source: str = 'timm state dict') -> dict[str, Any]:
  """VisionTransformer params from a timm ViT state dict (e.g. `vit_base_patch16_224`).

  The class token and its position slot are dropped (SONICHU has none: the result is exact for timm
  models built with `class_token=False`, an initialisation otherwise), the classifier `head.*` is
  dropped, and the position table is resampled to `grid` as timm does. Anything else unused (layer
  scale, fc_norm, registers) is an error.
  """
  sd = {k: v for k, v in state_dict.items() if k not in ('cls_token', 'head.weight', 'head.bias')}
  if 'pos_embed' in sd:
    pos = np.asarray(sd['pos_embed'])
    n = pos.shape[1]
    is_grid = (n == src_grid[0] * src_grid[1] if src_grid is not None else
               n == grid[0] * grid[1] or round(n ** 0.5) ** 2 == n)
    if 'cls_token' in state_dict and not is_grid:
      pos = pos[:, 1:]  # timm's class-token slot (absent with no_embed_class=True).
    src = _source_grid(pos.shape[1], grid, src_grid, source)
    sd['pos_embed'] = resample_pos_embed(pos, src, grid)
  return _strict_backbone(sd, grid, mlp_ratio, source)


def backbone_from_ijepa(checkpoint: Mapping[str, Any], grid: tuple[int, int] = (16, 16), *,
                        encoder: str = 'target_encoder', mlp_ratio: float = 4.0,
                        source: str = 'I-JEPA checkpoint') -> dict[str, Any]:
  """VisionTransformer params from a facebookresearch/ijepa checkpoint.

  Args:
    checkpoint: the saved dict ({'encoder', 'predictor', 'target_encoder', 'opt', ...}), or an
      encoder state dict; DDP's `module.` prefix is removed.
    grid: token grid of the target model; the position table is resampled if it differs.
    encoder: 'target_encoder' (the EMA encoder, which the I-JEPA paper evaluates) or 'encoder'.
    mlp_ratio: MLP width / embedding width.
    source: names the file in error messages.
  """
  if encoder not in ('target_encoder', 'encoder'):
    raise errors.InputError(
        f"{source}: encoder must be 'target_encoder' or 'encoder', got {encoder!r}")
  sd = checkpoint
  if 'target_encoder' in checkpoint or 'encoder' in checkpoint:
    if encoder not in checkpoint:
      raise errors.InputError(f'{source}: no {encoder!r} entry; entries: {sorted(checkpoint)}')
    sd = checkpoint[encoder]
  sd = {k.removeprefix('module.'): v for k, v in sd.items()}
  if 'pos_embed' in sd:
    pos = np.asarray(sd['pos_embed'])
    sd['pos_embed'] = resample_pos_embed(pos, _source_grid(pos.shape[1], grid, None, source), grid)
  return _strict_backbone(sd, grid, mlp_ratio, f'{source} [{encoder}]')


def _mmpose_state_dict(checkpoint: Mapping[str, Any], source: str) -> Mapping[str, np.ndarray]:
  sd = checkpoint.get('state_dict', checkpoint)
  if not isinstance(sd, Mapping):
    raise errors.InputError(f'{source}: "state_dict" is a {type(sd).__name__}, not a state dict')
  return sd


def backbone_from_vitpose(checkpoint: Mapping[str, Any], grid: tuple[int, int] = (16, 16), *,
                          src_grid: tuple[int, int] | None = None, mlp_ratio: float = 4.0,
                          source: str = 'ViTPose checkpoint') -> dict[str, Any]:
  """VisionTransformer params from an mmpose ViTPose checkpoint's `backbone.*` tensors.

  ViTPose adds its class-token slot to every patch position (`pos_embed[:, 1:] + pos_embed[:, :1]`),
  so that slot is folded into the table; `last_norm` is our `norm`. The model must be built with
  `patch_padding=2` to reproduce ViTPose's features (its patch conv pads by 2 pixels). ViTPose-B is
  trained at 256x192, a (16, 12) grid: pass `src_grid` for non-square tables resampled to `grid`.
  """
  sd = _mmpose_state_dict(checkpoint, source)
  sd = {k.removeprefix('backbone.'): v for k, v in sd.items() if k.startswith('backbone.')}
  sd = {('norm.' + k.removeprefix('last_norm.') if k.startswith('last_norm.') else k): v
        for k, v in sd.items()}
  if 'pos_embed' in sd:
    pos = np.asarray(sd['pos_embed'])
    pos = pos[:, 1:] + pos[:, :1]
    src = _source_grid(pos.shape[1], grid, src_grid, source)
    sd['pos_embed'] = resample_pos_embed(pos, src, grid)
  return _strict_backbone(sd, grid, mlp_ratio, source)


def head_from_vitpose(checkpoint: Mapping[str, Any], template: Mapping[str, Any], *,
                      head: str = 'keypoint_head', final_layer: bool = True,
                      source: str = 'ViTPose checkpoint') -> dict[str, Any]:
  """ViTPoseHead variables ({'params', 'batch_stats'}) from mmpose checkpoint tensors `{head}.*`.

  Args:
    checkpoint: mmpose checkpoint ({'state_dict': ...}) or its state dict.
    template: the head's variables or their shapes, e.g. a SonichuModel's
      {'params': params['heads_HC'], 'batch_stats': batch_stats['heads_HC']}.
    head: 'keypoint_head', or e.g. 'associate_keypoint_heads.0' for ViTPose++'s dataset heads.
    final_layer: False drops the checkpoint's `final_layer` (whose K is the source dataset's,
      e.g. 17 for COCO) and keeps the template's; it must then hold arrays, not shapes.
    source: names the file in error messages.
  """
  sd = _mmpose_state_dict(checkpoint, source)
  prefix = head + '.'
  sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
  if not sd:
    raise errors.InputError(f'{source}: no tensors under {prefix!r}')
  params = dict(template['params'])
  if not final_layer:
    sd = {k: v for k, v in sd.items() if not k.startswith('final_layer.')}
    kept = params.pop('final_layer')
  out = import_variables(sd, {'params': params, 'batch_stats': template['batch_stats']},
                         source=f'{source} [{head}]')
  if not final_layer:
    out['params']['final_layer'] = kept
  return out


# ----------------------------------------------------------------------------------------------
# The whole SONICHU model.

def from_sonichu(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
                 source: str = 'SONICHU state dict') -> dict[str, Any]:
  """SonichuModel variables from a SONICHU-layout state dict (see the module docstring).

  `template` is the model's variables or their shapes (`sonichu.abstract_variables(model)`); it
  fixes the tasks, the widths and the grid, and every one of its leaves must be in the file.
  """
  return import_variables(state_dict, template, source=source)


def to_sonichu(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """SonichuModel variables -> the SONICHU-layout state dict (for `write_safetensors` or torch)."""
  return export_variables(variables)
