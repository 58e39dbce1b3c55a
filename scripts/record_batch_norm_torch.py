"""Records torch's BatchNorm statistics and outputs for tests/test_batch_norm.py (needs torch).

    python scripts/record_batch_norm_torch.py [--out=tests/fixtures/batch_norm_torch.npz]

For `torch.nn.BatchNorm2d` ('2d/') and `BatchNorm3d` ('3d/'), momentum 0.1 and eps 1e-5, with
seeded non-trivial `weight` and `bias`: two training steps on fixed seeded float32 inputs, then one
evaluation step. Stored (channels-first, as torch has them; float32):
  {2d,3d}/weight, bias              the affine parameters (C,);
  {2d,3d}/x0, x1                    the two training batches, (N, C, H, W) or (N, C, T, H, W);
  {2d,3d}/y0, y1                    torch's train-mode outputs of x0 and x1;
  {2d,3d}/running_mean0, _var0, running_mean1, _var1   the buffers after each training step;
  {2d,3d}/x_eval, y_eval            an eval-mode input and torch's output (running statistics).
Recorded with torch 2.13.0 (CPU wheel), NumPy 2.4.6, in a virtual environment outside the
repository; the tests read only the .npz and never import torch.
"""
import argparse
import os

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, 'tests', 'fixtures', 'batch_norm_torch.npz')
# Small batches: n = 24 and 36 values per channel make n / (n - 1) visible (about 4% and 3%).
SHAPES = {'2d': (2, 3, 3, 4), '3d': (2, 3, 2, 3, 3)}
LAYERS = {'2d': torch.nn.BatchNorm2d, '3d': torch.nn.BatchNorm3d}


def record(kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
  shape = SHAPES[kind]
  channels = shape[1]
  layer = LAYERS[kind](channels, eps=1e-5, momentum=0.1)
  weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(weight))
    layer.bias.copy_(torch.from_numpy(bias))
  out = {'weight': weight, 'bias': bias}
  # Per-channel offsets and scales, so that each channel's statistics differ.
  channel_shape = (1, channels) + (1,) * (len(shape) - 2)
  loc = rng.uniform(-2, 2, channel_shape)
  spread = rng.uniform(0.5, 3, channel_shape)
  layer.train()
  for step in range(2):
    x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
    with torch.no_grad():
      y = layer(torch.from_numpy(x))
    out[f'x{step}'], out[f'y{step}'] = x, y.numpy()
    out[f'running_mean{step}'] = layer.running_mean.numpy().copy()
    out[f'running_var{step}'] = layer.running_var.numpy().copy()
  layer.eval()
  x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
  with torch.no_grad():
    out['x_eval'], out['y_eval'] = x, layer(torch.from_numpy(x)).numpy()
  return {f'{kind}/{key}': value for key, value in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(20260101)
  arrays = {}
  for kind in SHAPES:
    arrays.update(record(kind, rng))
  np.savez(args.out, torch_version=np.array(torch.__version__), **arrays)
  print(f'wrote {args.out}: torch {torch.__version__}, {len(arrays)} arrays')


if __name__ == '__main__':
  main()
