"""Records the layer-wise learning-rate decay golden with ViTPose's constructor and torch's AdamW.

    python scripts/record_layer_decay_golden.py --vitpose=/path/to/ViTPose \
        [--out=tests/fixtures/optim/layer_decay.npz]

`--vitpose` is a checkout of github.com/ViTAE-Transformer/ViTPose (commit c050ed2); its
`mmcv_custom/layer_decay_optimizer_constructor.py` is imported from there (never copied here),
with the three mmcv names it imports stubbed (registry decorator, base class, `get_dist_info`), so
that its own `add_params` builds the parameter groups. Needs torch (never run in CI).

The parameters: a toy two-block ViT with ViTPose's names (`backbone.patch_embed`, `pos_embed`,
`blocks.{i}`, `last_norm`) and two heads, seeded values and gradients. `patch_embed.proj.bias` is
frozen (requires_grad False: the constructor skips it); head B has no gradient in the second step
(a batch of another task: torch's AdamW skips it). Two steps of torch.optim.AdamW (lr 0.05, wd 0.1,
layer decay 0.75 over 2 + 2 layers) after clip_grad_norm_(1.0), with the groups' learning rates
times the schedule factors 0.5 and 1 (mmcv's LrUpdaterHook sets each group's lr to
factor * its initial lr), as `launch.optim`'s 'linear_warmup_cosine' with 2 warm-up steps gives.

Keys, per parameter under its Flax path (same shapes: AdamW is elementwise): `init/<path>`,
`grad0/<path>`, `grad1/<path>` (absent for head B), `step1/<path>`, `step2/<path>`, and for the
parameters the constructor saw `lr_scale/<path>`, `weight_decay/<path>` (the group's values).
"""
import argparse
import importlib.util
import os
import sys
import types

import numpy as np

LR, WEIGHT_DECAY, RATE, DEPTH = 0.05, 0.1, 0.75, 2
FACTORS = (0.5, 1.0)
# (torch name, Flax path, shape)
PARAMS = [('backbone.patch_embed.proj.weight', 'backbone/patch_embed/proj/kernel', (4, 3, 2, 2)),
          ('backbone.patch_embed.proj.bias', 'backbone/patch_embed/proj/bias', (4,)),
          ('backbone.pos_embed', 'backbone/pos_embed', (1, 4, 4))]
for _i in range(DEPTH):
  PARAMS += [(f'backbone.blocks.{_i}.norm1.weight', f'backbone/blocks_{_i}/norm1/scale', (4,)),
             (f'backbone.blocks.{_i}.norm1.bias', f'backbone/blocks_{_i}/norm1/bias', (4,)),
             (f'backbone.blocks.{_i}.attn.qkv.weight', f'backbone/blocks_{_i}/attn/qkv/kernel',
              (4, 12)),
             (f'backbone.blocks.{_i}.attn.qkv.bias', f'backbone/blocks_{_i}/attn/qkv/bias', (12,)),
             (f'backbone.blocks.{_i}.mlp.fc1.weight', f'backbone/blocks_{_i}/mlp/fc1/kernel',
              (4, 8))]
PARAMS += [('backbone.last_norm.weight', 'backbone/norm/scale', (4,)),
           ('backbone.last_norm.bias', 'backbone/norm/bias', (4,)),
           ('heads_A.deconv.weight', 'heads_A/deconv/kernel', (2, 2, 4, 3)),
           ('heads_A.final.bias', 'heads_A/final/bias', (3,)),
           ('heads_B.deconv.weight', 'heads_B/deconv/kernel', (2, 2, 4, 3)),
           ('heads_B.final.bias', 'heads_B/final/bias', (3,))]
FROZEN = 'backbone.patch_embed.proj.bias'
UNUSED_IN_STEP_2 = 'heads_B.'


def import_constructor(vitpose: str):
  """ViTPose's LayerDecayOptimizerConstructor, with mmcv.runner's three names stubbed."""
  runner = types.ModuleType('mmcv.runner')
  runner.OPTIMIZER_BUILDERS = types.SimpleNamespace(register_module=lambda: lambda cls: cls)
  runner.DefaultOptimizerConstructor = object
  runner.get_dist_info = lambda: (0, 1)
  sys.modules['mmcv'] = types.ModuleType('mmcv')
  sys.modules['mmcv.runner'] = runner
  # The file alone: the package's __init__ imports the rest of mmcv.
  spec = importlib.util.spec_from_file_location(
      'layer_decay_optimizer_constructor',
      os.path.join(vitpose, 'mmcv_custom', 'layer_decay_optimizer_constructor.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.LayerDecayOptimizerConstructor


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vitpose', required=True)
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures', 'optim',
      'layer_decay.npz'))
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  constructor_cls = import_constructor(args.vitpose)

  rng = np.random.default_rng(0)
  module = torch.nn.Module()
  flax_path = {}
  for name, path, shape in PARAMS:
    parameter = torch.nn.Parameter(torch.tensor(rng.standard_normal(shape), dtype=torch.float32),
                                   requires_grad=name != FROZEN)
    module.register_parameter(name.replace('.', '__'), parameter)
    flax_path[name] = path
  # named_parameters() must give the dotted names the constructor parses.
  named = {name: getattr(module, name.replace('.', '__')) for name, _, _ in PARAMS}
  module.named_parameters = lambda: iter(named.items())

  constructor = types.SimpleNamespace(
      paramwise_cfg={'num_layers': DEPTH, 'layer_decay_rate': RATE}, base_wd=WEIGHT_DECAY,
      base_lr=LR)
  groups = []
  constructor_cls.add_params(constructor, groups, module)
  optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
  for group in optimizer.param_groups:
    group['initial_lr'] = group['lr']

  out = {f'init/{flax_path[n]}': p.detach().numpy().copy() for n, p in named.items()}
  for group in groups:
    for name in group['param_names']:
      out[f'lr_scale/{flax_path[name]}'] = np.float64(group['lr_scale'])
      out[f'weight_decay/{flax_path[name]}'] = np.float64(group['weight_decay'])
  trainable = [p for p in named.values() if p.requires_grad]
  for step, factor in enumerate(FACTORS):
    optimizer.zero_grad(set_to_none=True)
    for name, p in named.items():
      if not p.requires_grad or (step == 1 and name.startswith(UNUSED_IN_STEP_2)):
        continue
      grad = 0.7 * rng.standard_normal(tuple(p.shape))
      p.grad = torch.tensor(grad, dtype=torch.float32)
      out[f'grad{step}/{flax_path[name]}'] = p.grad.numpy().copy()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    for group in optimizer.param_groups:
      group['lr'] = factor * group['initial_lr']
    optimizer.step()
    out.update({f'step{step + 1}/{flax_path[n]}': p.detach().numpy().copy()
                for n, p in named.items()})
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez(args.out, **out)
  print(f'wrote {args.out}: {len(out)} arrays')


if __name__ == '__main__':
  main()
