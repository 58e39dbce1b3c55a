"""PyTorch state dicts of the original DualTrack <-> our Flax variables, strictly.

One mechanism: a *table* is a tuple of `Part`s, each mapping a subtree of the Flax variables
(`flax_path`) to a torch key prefix with a naming `Scheme`. A Flax leaf's torch key is the prefix,
then its module path renamed by the scheme's rules ('/' -> '.'), then its leaf name (`kernel`,
`scale`, `embedding` -> `weight`; batch_stats `mean`, `var` -> `running_mean`, `running_var`).
Every BatchNorm also has the torch buffer `num_batches_tracked`. Layouts: Dense kernel (in, out) is
Linear (out, in); Conv kernels (kT, kH, kW, I, O) / (kH, kW, I, O) are torch (O, I, kT, kH, kW) /
(O, I, kH, kW); the global CNN's 2D kernels are stored as Conv3d (O, I, 1, kH, kW); everything else
(biases, LayerNorm and BatchNorm vectors, embeddings, the ViT's cls_token and
position_embeddings) keeps its layout.

Tables: the models (`DUALTRACK`, both presets; `LOCAL_STAGE1` = the original's
`VideoResnetTrackingEstimator`; `LOCAL_STAGE2` / `LOCAL_STAGE3` = its stage-2 / stage-3 local
encoders; `GLOBAL_ENCODER`) and single blocks whose state dict has no prefix (`VIDEO_RESNET`,
`IMAGE_RESNET`, `VIT`, `BERT` for a BertEncoder or a lone BertLayer), e.g.

  variables = convert.from_torch(state_dict, jax.eval_shape(model.init, rng, x), convert.BERT)

`torch_shapes(variables, table)` gives the torch keys and shapes of a model's variables (from
`jax.eval_shape` alone). `to_torch` writes a state dict, in the original's key order. Strictness:
`from_torch` uses every torch key, fills every Flax leaf and checks every shape, or raises one
ValueError listing the missing keys, the unused keys and the wrong shapes (10 of each at most).
Nothing is re-initialised unless asked for by name (`allow_reinit`), unlike the original's
loader, which silently drops every tensor whose shape differs.
"""
import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import re
from typing import Any

from absl import logging
import flax
import jax
import numpy as np

from ultrasound_common import errors


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How the Flax module names of one kind of block become torch names.

  Attributes:
    name: for messages.
    order: torch names in the order torch registers them (its state-dict order); integer names
      sort numerically, leaf names (weight, bias, BN buffers) come after these.
    rules: regex substitutions applied in turn to the '/'-joined Flax module path.
    conv_as_3d: 2D conv kernels are stored as torch Conv3d with a temporal size of 1.
  """
  name: str
  order: tuple[str, ...] = ()
  rules: tuple[tuple[str, str], ...] = ()
  conv_as_3d: bool = False

  def torch_module(self, flax_module_path: Sequence[str]) -> str:
    """The dotted torch module name of a Flax module path (relative to its part)."""
    path = '/'.join(flax_module_path)
    for pattern, replacement in self.rules:
      path = re.sub(pattern, replacement, path)
    return path.replace('/', '.')


@dataclasses.dataclass(frozen=True)
class Part:
  """The Flax subtree at `flax_path` is the torch keys `torch_prefix*`, named by `scheme`."""
  flax_path: tuple[str, ...]
  torch_prefix: str
  scheme: Scheme


Table = tuple[Part, ...]

_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight',
               'mean': 'running_mean', 'var': 'running_var'}
_LEAF_ORDER = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_COUNTER = 'num_batches_tracked'

# Dense, Embed or Dense-like parameters at a part's root.
PLAIN_SCHEME = Scheme('plain')
_RESNET_ORDER = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'conv1', 'conv2', 'downsample')
# torchvision VideoResNet (stem, layer1..4): Flax paths are the torch names.
VIDEO_RESNET_SCHEME = Scheme('video_resnet', _RESNET_ORDER)
IMAGE_RESNET_SCHEME = Scheme('image_resnet', _RESNET_ORDER, conv_as_3d=True)
# HF BertEncoder / BertLayer: layer_{i} -> layer.{i}; q, k, v and the distance table sit in `self`.
BERT_SCHEME = Scheme(
    'bert',
    ('layer', 'attention', 'self', 'query', 'key', 'value', 'distance_embedding',
     'crossattention', 'intermediate', 'output', 'dense', 'LayerNorm'),
    ((r'(^|/)layer_(\d+)(?=/|$)', r'\1layer/\2'),
     (r'(^|/)(attention|crossattention)/(query|key|value|distance_embedding)(?=/|$)',
      r'\1\2/self/\3')))
# HF ViTModel without pooler; our layers drop HF's `encoder.`, `attention.attention` and `.dense`.
VIT_SCHEME = Scheme(
    'vit',
    ('embeddings', 'cls_token', 'position_embeddings', 'patch_embeddings', 'projection',
     'encoder', 'layer', 'attention', 'query', 'key', 'value', 'intermediate', 'output', 'dense',
     'layernorm_before', 'layernorm_after', 'layernorm'),
    ((r'^embeddings/patch_embeddings$', 'embeddings/patch_embeddings/projection'),
     (r'^layer_(\d+)/attention/(query|key|value)$', r'encoder/layer/\1/attention/attention/\2'),
     (r'^layer_(\d+)/attention/output$', r'encoder/layer/\1/attention/output/dense'),
     (r'^layer_(\d+)/(intermediate|output)$', r'encoder/layer/\1/\2/dense'),
     (r'^layer_(\d+)/(layernorm_before|layernorm_after)$', r'encoder/layer/\1/\2')))


def nest(table: Table, flax_path: tuple[str, ...], torch_prefix: str) -> Table:
  """`table` for the same block placed at `flax_path` / under `torch_prefix` in a larger model."""
  return tuple(Part(flax_path + p.flax_path, torch_prefix + p.torch_prefix, p.scheme)
               for p in table)


# Single blocks, state dicts without prefix (e.g. the parity goldens of each block).
VIDEO_RESNET = (Part((), '', VIDEO_RESNET_SCHEME),)  # resnet3d.VideoResNet
IMAGE_RESNET = (Part((), '', IMAGE_RESNET_SCHEME),)  # resnet2d.ImageResNet
VIT = (Part((), '', VIT_SCHEME),)  # transformer.ViTEncoder <-> HF ViTModel
BERT = (Part((), '', BERT_SCHEME),)  # transformer.BertEncoder / BertLayer

# local_encoder.LocalEncoderStage1 <-> `VideoResnetTrackingEstimator` (`vidrn18_trck_reg` etc.).
LOCAL_STAGE1 = (Part(('backbone',), 'backbone.', VIDEO_RESNET_SCHEME),
                Part(('fc',), 'fc.', PLAIN_SCHEME))
# dualtrack.LocalEncoder(stage=2) <-> `cnn_sp_attn`'s FeatureExtractorWithSpatialSelfAttentionV1;
# the CNN sits in FrozenModuleWrapper(VideoResnetWrapperForFeatureMaps(...)).
LOCAL_STAGE2 = (Part(('cnn',), 'backbone.module.backbone.', VIDEO_RESNET_SCHEME),
                Part(('vit',), 'vit.', VIT_SCHEME),
                Part(('vit_fc',), 'fc.', PLAIN_SCHEME))
# dualtrack.LocalEncoder(stage=3) <-> LocalEncoderSPTAttn(FrozenModuleWrapper(stage 2), temporal).
LOCAL_STAGE3 = nest(LOCAL_STAGE2, (), 'backbone.module.') + (
    Part(('temporal',), 'temporal_encoder.encoder.', BERT_SCHEME),
    Part(('temporal_fc',), 'temporal_encoder.fc.', PLAIN_SCHEME))
# dualtrack.GlobalEncoder <-> SimpleModelForSparseTrackingEstimation (`global_encoder_cnn`).
GLOBAL_ENCODER = (Part(('backbone',), 'backbone.0.backbone.', IMAGE_RESNET_SCHEME),
                  Part(('pos_emb',), 'pos_emb.', PLAIN_SCHEME),
                  Part(('proj',), 'proj.', PLAIN_SCHEME),
                  Part(('bert',), 'bert.', BERT_SCHEME),
                  Part(('fc',), 'fc.', PLAIN_SCHEME))
# dualtrack.DualTrack <-> `DualTrack` (`dualtrack_fusion_model`; both released presets); its local
# encoder is Sequential(stage 3, Linear(64, 512, bias=False)).
DUALTRACK = (nest(GLOBAL_ENCODER, ('global_encoder',), 'global_encoder.')
             + nest(LOCAL_STAGE3, ('local_encoder',), 'local_encoder.0.')
             + (Part(('local_encoder', 'proj'), 'local_encoder.1.', PLAIN_SCHEME),
                Part(('fusion',), 'fusion_module.module.', BERT_SCHEME),
                Part(('head',), 'head.fc.', PLAIN_SCHEME)))


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One torch tensor: its key and shape, and the Flax leaf it is (None: `num_batches_tracked`)."""
  key: str
  shape: tuple[int, ...]
  leaf: tuple[str, ...] | None  # (collection, *path)
  to_flax: Callable[[np.ndarray], np.ndarray] | None = None
  to_torch: Callable[[np.ndarray], np.ndarray] | None = None


def _flatten(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  leaves = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for path in leaves:
    if path[0] not in ('params', 'batch_stats'):
      raise errors.InputError(f'convert: unsupported variable collection {path[0]!r} (at '
                              f'{"/".join(path)}); only params and batch_stats have torch tensors')
  return leaves


def _kernel_layout(shape: tuple[int, ...], conv_as_3d: bool, where: str):
  """(torch shape, torch -> Flax, Flax -> torch) of a Dense or Conv kernel of Flax `shape`."""
  if len(shape) == 2:  # Linear (out, in)
    return shape[::-1], np.transpose, np.transpose
  if len(shape) == 4 and conv_as_3d:  # Conv3d (O, I, 1, kH, kW)
    kh, kw, i, o = shape
    return ((o, i, 1, kh, kw), lambda t: t[:, :, 0].transpose(2, 3, 1, 0),
            lambda k: k.transpose(3, 2, 0, 1)[:, :, None])
  if len(shape) == 4:  # Conv2d (O, I, kH, kW)
    kh, kw, i, o = shape
    return ((o, i, kh, kw), lambda t: t.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
  if len(shape) == 5:  # Conv3d (O, I, kT, kH, kW)
    kt, kh, kw, i, o = shape
    return ((o, i, kt, kh, kw), lambda t: t.transpose(2, 3, 4, 1, 0),
            lambda k: k.transpose(4, 3, 0, 1, 2))
  raise errors.InputError(f'convert: no torch layout for the {len(shape)}-d kernel {where}')


def _part_of(table: Table, path: tuple[str, ...]) -> Part | None:
  matches = [p for p in table if path[:len(p.flax_path)] == p.flax_path]
  return max(matches, key=lambda p: len(p.flax_path), default=None)


def _sort_key(part_index: int, part: Part, key: str) -> tuple:
  order = part.scheme.order + _LEAF_ORDER
  ranks = []
  for name in key[len(part.torch_prefix):].split('.'):
    if name.isdigit():
      ranks.append((0, int(name)))
    elif name in order:
      ranks.append((1, order.index(name)))
    else:
      raise errors.InputError(f'convert: scheme {part.scheme.name!r} does not know the torch name '
                              f'{name!r} of {key} (a module name that the table does not cover)')
  return part_index, ranks


def _torch_layout(variables: Mapping[str, Any], table: Table) -> list[_Entry]:
  """The torch state dict of `variables` (arrays or ShapeDtypeStructs), in torch's key order."""
  entries = []
  for leaf, value in _flatten(variables).items():
    collection, path = leaf[0], leaf[1:]
    where = '/'.join(leaf)
    part = _part_of(table, path)
    if part is None:
      raise errors.InputError(f'convert: the table has no part for the Flax leaf {where}')
    index = table.index(part)
    relative = path[len(part.flax_path):]
    module = part.scheme.torch_module(relative[:-1])
    prefix = part.torch_prefix + (module + '.' if module else '')
    shape = tuple(value.shape)
    if relative[-1] == 'kernel':
      torch_shape, to_flax, to_torch = _kernel_layout(shape, part.scheme.conv_as_3d, where)
    else:
      torch_shape, to_flax, to_torch = shape, np.asarray, np.asarray
    key = prefix + _LEAF_NAMES.get(relative[-1], relative[-1])
    entries.append((_sort_key(index, part, key), _Entry(key, torch_shape, leaf, to_flax,
                                                        to_torch)))
    if collection == 'batch_stats' and relative[-1] == 'mean':
      counter = prefix + _COUNTER
      entries.append((_sort_key(index, part, counter), _Entry(counter, (), None)))
  entries.sort(key=lambda e: e[0])
  duplicates = [k for k, n in collections.Counter(e.key for _, e in entries).items() if n > 1]
  if duplicates:
    raise errors.InputError(f'convert: the table maps several Flax leaves to {duplicates[:10]}')
  return [e for _, e in entries]


def torch_shapes(variables: Mapping[str, Any], table: Table) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} of the state dict that `variables` corresponds to, in torch order."""
  return {e.key: e.shape for e in _torch_layout(variables, table)}


def _listing(title: str, items: Sequence[str]) -> str:
  shown = '\n    '.join(items[:10])
  more = f'\n    ... and {len(items) - 10} more' if len(items) > 10 else ''
  return f'\n  {title} ({len(items)}):\n    {shown}{more}'


def from_torch(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any], table: Table,
               *, allow_reinit: str | None = None) -> dict[str, Any]:
  """Flax variables in the structure of `template` from a torch state dict, strictly.

  Args:
    state_dict: torch key -> array in torch layout (e.g. `launch.torch_io.load_state_dict`), of the
      model (or block) that `table` describes, without any extra prefix.
    template: the variables being filled ({'params', 'batch_stats'}), e.g.
      `jax.eval_shape(model.init, ...)`; leaves give the shapes and dtypes (values are cast).
    table: the model's table (`DUALTRACK`, `LOCAL_STAGE1`, `BERT`, ...).
    allow_reinit: regex over torch keys. A tensor whose key matches and whose shape differs from
      the model's keeps the template's value (which must then be initialised, `model.init`, not
      an eval_shape), with a log line each: an explicit form of the original's re-initialisation
      of the 17 position tables when the 2025 finetune starts from the 2024 model
      (docs/dualtrack.md, section "TUS-REC 2025 finetuning").

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of NumPy arrays.

  Raises:
    ValueError: missing or unused keys, wrong shapes, a non-scalar or non-integer
      `num_batches_tracked`, or a non-float tensor for a parameter; every problem is listed.
  """
  missing, shapes, reinit, out = [], [], [], {}
  template_leaves = _flatten(template)
  entries = _torch_layout(template, table)
  for entry in entries:
    if entry.key not in state_dict:
      missing.append(entry.key)
      continue
    value = np.asarray(state_dict[entry.key])
    if entry.leaf is None:
      if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        shapes.append(f'{entry.key}: {value.dtype}{list(value.shape)} in the checkpoint, '
                      'expected a scalar integer (BatchNorm counter)')
      continue
    target = template_leaves[entry.leaf]
    where = f'Flax {"/".join(entry.leaf)} {tuple(target.shape)}'
    if value.shape != entry.shape:
      if allow_reinit and re.search(allow_reinit, entry.key):
        if isinstance(target, jax.ShapeDtypeStruct):
          raise errors.InputError(f'convert.from_torch: allow_reinit needs an initialised template '
                                  f'(model.init), not shapes only, to re-initialise {entry.key}')
        reinit.append(entry.key)
        logging.warning('Re-initialised %s: %s in the checkpoint, %s in the model (allow_reinit).',
                        entry.key, value.shape, entry.shape)
        out[entry.leaf] = np.asarray(target)
      else:
        shapes.append(f'{entry.key}: {value.shape} in the checkpoint, expected {entry.shape} '
                      f'({where})')
      continue
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != 'bfloat16':
      shapes.append(f'{entry.key}: dtype {value.dtype} in the checkpoint, expected floating '
                    f'point ({where})')
      continue
    out[entry.leaf] = entry.to_flax(value).astype(target.dtype, copy=False)
  known = {e.key for e in entries}
  unused = [k for k in state_dict if k not in known]
  if missing or unused or shapes:
    message = 'convert.from_torch: the state dict does not fit the model'
    if missing:
      message += _listing('missing keys, in the model but not in the state dict', missing)
    if unused:
      message += _listing('unused keys, in the state dict but not in the model', unused)
    if shapes:
      message += _listing('wrong shapes or dtypes', shapes)
    raise errors.InputError(message)
  if allow_reinit and not reinit:
    logging.info('allow_reinit=%r: every tensor fitted, nothing re-initialised.', allow_reinit)
  return flax.traverse_util.unflatten_dict(out)


def to_torch(variables: Mapping[str, Any], table: Table) -> dict[str, np.ndarray]:
  """The torch state dict of `variables` (inverse of `from_torch`), in the original's key order.

  Arrays keep their dtype. BatchNorm's `num_batches_tracked` is written as an int64 0: Flax does
  not count batches, so the original value is lost (torch reads it only for BatchNorm with
  momentum=None, which DualTrack does not use).
  """
  leaves = _flatten(variables)
  state_dict = {}
  for entry in _torch_layout(variables, table):
    if entry.leaf is None:
      state_dict[entry.key] = np.zeros((), np.int64)
    else:
      state_dict[entry.key] = np.array(entry.to_torch(np.asarray(leaves[entry.leaf])), order='C')
  return state_dict
