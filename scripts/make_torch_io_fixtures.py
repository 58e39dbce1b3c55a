"""Writes the small `torch.save` files of tests/fixtures/torch_io/ (needs torch; never run in CI).

    python scripts/make_torch_io_fixtures.py [--out=tests/fixtures/torch_io]

Files (every tensor is random unless said otherwise; the expected values come from torch itself,
`Tensor.numpy()`, into `expected.npz`, so that the test compares our reader with torch):
  raw_state_dict.pt       a raw OrderedDict: one tensor per supported dtype (float32, float16,
                          bfloat16, float64, int64, int32, uint8, bool), a 0-d int64, a transposed
                          (non-contiguous) tensor, two views into one shared storage (offset,
                          stride 3), an empty tensor;
  training_checkpoint.pt  what the original's `run_training` writes: {'model', 'optimizer',
                          'scheduler', 'scaler', 'best_score', 'epoch', 'config'} with `_orig_mod.`
                          keys (torch.compile) and a scheduler that pickles class instances (a
                          CosineAnnealingLR inside a state dict, a `src.optimizer.optimizer`
                          dataclass), like the original's WarmupScheduler;
  malicious.pt            a pickle whose object is `os.system('echo ...')`; must be refused;
  legacy.pt               the pre-1.6 (non-zip) format; must be refused with a clear message;
  local_stage1_tiny.pt    a stage-1 `VideoResnetTrackingEstimator` state dict (`backbone.*`,
                          `fc.*`, keys and order from dualtrack_state_dict_keys.txt) narrowed to
                          widths (3, 4, 5, 6), stem width 2: the input of the CLI test.
expected.npz holds, for `raw_state_dict.pt` and the model of `training_checkpoint.pt` (prefixed
`train/`), every tensor's values (bfloat16 as its uint16 bit pattern).
"""
import argparse
import collections
import dataclasses
import os
import sys
import types

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, 'tests', 'fixtures', 'torch_io')
# The local 3D CNN inside the full model; stage 1 saves it as `backbone.` (+ `fc.`).
CNN_PREFIX = 'local_encoder.0.backbone.module.backbone.module.backbone.'
# Full width -> tiny width of the stage-1 fixture (the 1-channel input stays 1).
TINY_WIDTHS = {1: 1, 45: 2, 64: 3, 128: 4, 256: 5, 512: 6}


def expected_value(tensor: torch.Tensor) -> np.ndarray:
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(np.uint16)
  return tensor.numpy()


def raw_state_dict() -> collections.OrderedDict:
  g = torch.Generator().manual_seed(0)
  shared = torch.randn(20, generator=g)
  return collections.OrderedDict([
      ('f32', torch.randn(3, 4, generator=g)),
      ('f16', torch.randn(5, generator=g).half()),
      ('bf16', torch.randn(2, 3, generator=g).bfloat16()),
      ('f64', torch.randn(2, generator=g, dtype=torch.float64)),
      ('i64', torch.arange(-3, 3).reshape(2, 3)),
      ('i32', torch.tensor([-1, 2**31 - 1], dtype=torch.int32)),
      ('u8', torch.tensor([0, 255, 7], dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('scalar_i64', torch.tensor(7)),
      ('transposed', torch.randn(3, 5, generator=g).t()),
      ('shared_a', shared[4:10].view(2, 3)),
      ('shared_b', shared[1::3]),
      ('empty', torch.zeros(0, 3)),
  ])


def training_checkpoint() -> tuple[dict, collections.OrderedDict]:
  """A checkpoint shaped like the original's `run_training` output, and its model state dict."""
  torch.manual_seed(1)
  model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
  model(torch.randn(4, 3)).sum().backward()
  optimizer.step()

  # The original's WarmupScheduler.state_dict() holds the wrapped scheduler object and a
  # dataclass of its own module: both are pickled as class instances.
  module = types.ModuleType('src.optimizer.optimizer')

  @dataclasses.dataclass
  class WarmupConfig:
    warmup_steps: int
    initial_lr_factor: float = 0.001

  WarmupConfig.__module__ = module.__name__
  WarmupConfig.__qualname__ = 'WarmupConfig'
  module.WarmupConfig = WarmupConfig
  for name in ('src', 'src.optimizer', 'src.optimizer.optimizer'):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules['src.optimizer.optimizer'] = module
  cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
  scheduler = {'scheduler': cosine, 'warmup_config': WarmupConfig(5), 'current_step': 1,
               'base_lrs': [1e-4], 'last_epoch': 1}

  state = model.state_dict()
  compiled = collections.OrderedDict(('_orig_mod.' + k, v) for k, v in state.items())
  checkpoint = {'model': compiled, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler,
                'scaler': torch.amp.GradScaler('cpu').state_dict(),
                'best_score': np.float64(4.25), 'epoch': 3,
                'config': {'model': {'name': 'tiny'}, 'train': {'lr': 1e-4}}}
  return checkpoint, state


class _System:
  """Unpickles as os.system('echo ...') with torch.load(weights_only=False) or plain pickle."""

  def __reduce__(self):
    return os.system, ('echo torch_io fixture: this payload must never run',)


def local_stage1_tiny(keys_file: str) -> collections.OrderedDict:
  """Stage-1 keys and order from the recorded full-model key list, narrowed to tiny widths."""
  g = torch.Generator().manual_seed(2)
  state = collections.OrderedDict()
  with open(keys_file) as f:
    for line in f:
      if not line.startswith(CNN_PREFIX):
        continue
      key, shape = line.rstrip('\n').split('\t')
      shape = eval(shape)  # noqa: S307 (our own fixture file: tuples such as (64, 45, 3, 1, 1))
      key = 'backbone.' + key[len(CNN_PREFIX):]
      name = key.rsplit('.', 1)[1]
      if name == 'num_batches_tracked':
        state[key] = torch.tensor(123)
        continue
      tiny = [TINY_WIDTHS[s] for s in shape[:2]] + list(shape[2:])
      if name == 'running_var':
        state[key] = 0.5 + torch.rand(tiny, generator=g)
      else:
        state[key] = 0.3 * torch.randn(tiny, generator=g)
  state['fc.weight'] = 0.3 * torch.randn(6, TINY_WIDTHS[512], generator=g)
  state['fc.bias'] = 0.3 * torch.randn(6, generator=g)
  return state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  path = lambda name: os.path.join(args.out, name)

  raw = raw_state_dict()
  torch.save(raw, path('raw_state_dict.pt'))
  checkpoint, model_state = training_checkpoint()
  torch.save(checkpoint, path('training_checkpoint.pt'))
  torch.save(_System(), path('malicious.pt'))
  torch.save({'w': torch.ones(2)}, path('legacy.pt'), _use_new_zipfile_serialization=False)
  torch.save(local_stage1_tiny(path('dualtrack_state_dict_keys.txt')),
             path('local_stage1_tiny.pt'))
  expected = {k: expected_value(v) for k, v in raw.items()}
  expected.update({'train/' + k: expected_value(v) for k, v in model_state.items()})
  np.savez(path('expected.npz'), **expected)
  for name in sorted(os.listdir(args.out)):
    print(f'{name}: {os.path.getsize(path(name))} bytes')


if __name__ == '__main__':
  main()
