"""SONICHU batched inference cases for `launch.benchmark --bench=inference --model=sonichu`.

`cases` is given `launch.bench_inference.Options` (read by attribute: sizes, dtypes, preset, tile,
original, seed) and yields mappings of that module's `Case` fields.

One case per batch size B (`--frames=B`): `SonichuModel` on B preprocessed 256x256 images for one
task (HC, 4 keypoints: the backbone and one head, what `launch.predict` runs per image batch),
(B, 256, 256, 3) float32 in, (B, 4, 2) normalised keypoints out.

There is no released SONICHU code, so the PyTorch side (`--original=timm`) is the same network
built from timm and torch.nn: timm's `VisionTransformer(class_token=False, global_pool='')` at
256x256, mmpose's classic head (two ConvTranspose2d 4x4 stride 2 + BatchNorm + ReLU, a 1x1 conv)
and the same soft-argmax, loaded with our weights through `sonichu_jax.convert.to_sonichu`, so
both sides compute the same function (their outputs are compared first).

Weights are seeded noise with activation-preserving scales (speed does not depend on them).

`options.model_options` selects `SWITCHES` ('KEY=VALUE', `--model_options`): the same function
computed another way (docs/performance.md), so the torch side is unchanged; with
fold_batch_norm=true ours runs on the folded variables.
"""
from collections.abc import Iterator, Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sonichu_jax import convert
from sonichu_jax import tasks
from sonichu_jax.models import heads
from sonichu_jax.models import sonichu
from ultrasound_common import attention
from ultrasound_common import errors
from ultrasound_common import switches

PRESETS = {'sonichu_124m': {}}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TASK = 'HC'
IMAGE_SIZE = 256
ORIGINAL = 'timm'
SWITCHES = {'attention_implementation': attention.IMPLEMENTATIONS,
            'deconv_implementation': heads.DECONV_IMPLEMENTATIONS,
            'fold_batch_norm': (False, True)}


def random_variables(model: sonichu.SonichuModel, seed: int) -> dict[str, Any]:
  """Seeded float32 noise in the model's tree (kernels N(0, 1 / fan_in), BN variances U(.5, 2))."""
  shapes = sonichu.abstract_variables(model, (IMAGE_SIZE, IMAGE_SIZE))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'var':
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    std = 1.0 / np.sqrt(np.prod(shape[:-1])) if name == 'kernel' else 0.1
    return (std * rng.standard_normal(shape) + (name == 'scale')).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def torch_model(model: sonichu.SonichuModel, variables: Mapping[str, Any], task: str):
  """The same network in PyTorch from timm, with `variables` loaded strictly; eval mode."""
  import timm  # Only with --original=timm: the project itself never needs torch.
  import torch

  nn = torch.nn
  k = tasks.get_task(task).num_keypoints

  class TorchSonichu(nn.Module):
    """timm ViT backbone + mmpose-named classic head + soft-argmax: images NCHW -> (B, K, 2)."""

    def __init__(self):
      super().__init__()
      self.backbone = timm.models.vision_transformer.VisionTransformer(
          img_size=IMAGE_SIZE, patch_size=model.patch_size, embed_dim=model.embed_dim,
          depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
          class_token=False, global_pool='', num_classes=0)
      head = nn.Module()
      f = model.head_filters
      head.deconv_layers = nn.Sequential(
          nn.ConvTranspose2d(model.embed_dim, f, 4, stride=2, padding=1, bias=False),
          nn.BatchNorm2d(f), nn.ReLU(),
          nn.ConvTranspose2d(f, f, 4, stride=2, padding=1, bias=False),
          nn.BatchNorm2d(f), nn.ReLU())
      head.final_layer = nn.Conv2d(f, k, 1)
      self.heads = nn.ModuleDict({task: head})

    def forward(self, images):
      b, _, h, w = images.shape
      g = model.patch_size
      tokens = self.backbone.forward_features(images)
      fmap = tokens.transpose(1, 2).reshape(b, model.embed_dim, h // g, w // g)
      head = self.heads[task]
      logits = head.final_layer(head.deconv_layers(fmap))
      _, _, hh, ww = logits.shape
      p = torch.softmax(logits.reshape(b, k, hh * ww) / model.temperature, dim=-1)
      p = p.reshape(b, k, hh, ww)
      xs = (torch.arange(ww, dtype=torch.float32) + 0.5) / ww
      ys = (torch.arange(hh, dtype=torch.float32) + 0.5) / hh
      return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1)

  module = TorchSonichu()
  state = {key: value for key, value in convert.to_sonichu(variables).items()
           if key.startswith('backbone.') or key.startswith(f'heads.{task}.')}
  missing, unexpected = module.load_state_dict(
      {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in state.items()}, strict=False)
  # BatchNorm's num_batches_tracked counters are not stored (convert drops them); nothing else
  # may be missing or left over.
  missing = [key for key in missing if not key.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise errors.InputError(f'bench_sonichu: torch model keys differ: missing {missing[:5]}, '
                            f'unexpected {unexpected[:5]}')
  return module.eval()


def cases(options, *, overrides: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
  """The cases of `options`: one per batch size (`options.sizes`).

  Args:
    options: sizes are batch sizes; preset 'sonichu_124m' (the default); original 'timm' or None.
    overrides: `SonichuModel` attributes replacing the preset's (a reduced model, for tests).
  """
  preset_name = options.preset or 'sonichu_124m'
  if preset_name not in PRESETS:
    raise errors.InputError(f'--preset={preset_name!r}: unknown; known: {sorted(PRESETS)}')
  if options.original not in (None, ORIGINAL):
    raise errors.InputError(f'--original={options.original!r}: SONICHU has no released code; use '
                            f'--original={ORIGINAL} (the same network built from timm)')
  if options.tile is not None:
    raise errors.InputError('--tile: SONICHU takes single images; there is nothing to tile')
  settings = switches.parse(options.model_options, SWITCHES)
  kwargs = {**PRESETS[preset_name], **(overrides or {}), 'tasks': (TASK,)}
  models = {name: sonichu.SonichuModel(**kwargs, **settings, dtype=DTYPES[name])
            for name in options.dtypes}
  reference = sonichu.SonichuModel(**kwargs)
  variables = random_variables(reference, options.seed)
  module = torch_model(reference, variables, TASK) if options.original else None
  ours = sonichu.fold_batch_norm(variables) if settings.get('fold_batch_norm') else variables
  rng = np.random.default_rng(options.seed)
  for batch in options.sizes:
    images = rng.standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    torch_inputs = ()
    if module is not None:
      import torch  # Only with --original.
      torch_inputs = (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),)
    yield dict(
        label=(f'sonichu {preset_name}, batch {batch} ({IMAGE_SIZE}x{IMAGE_SIZE}, task {TASK}, '
               f'ViT depth {reference.depth} width {reference.embed_dim})'
               f'{switches.describe(settings)}'),
        items=batch, item_name='images', inputs=(images,),
        variants=tuple(dict(dtype=name, fn=functools.partial(_apply, models[name]),
                            variables=ours) for name in options.dtypes),
        torch_module=module, torch_inputs=torch_inputs,
        to_numpy=lambda coords: coords.float().numpy())


def _apply(model: sonichu.SonichuModel, variables, images):
  return model.apply(variables, images, TASK)
