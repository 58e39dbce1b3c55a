"""DualTrack's training steps in PyTorch, for `launch.benchmark --bench=train --original=PATH`.

Local stage 1: the original's own `vidrn18_trck_reg` (`src/models/local_encoder.py` of a checkout
of github.com/ImFusionGmbH/DualTrack), in train mode, on the batch's 16-frame windows: MSE on the
relative 6-vectors, backward, torch.optim.AdamW, as its training script does (no clipping unless
`config.optim.grad_clip_norm`). Its weights are the original's initialisation (speed does not
depend on them). Only the released widths are built by the original, so the config must be the
full recipe's network.
"""
import os
import sys

import numpy as np

from ultrasound_common import errors

_RELEASED = dict(widths=(64, 128, 256, 512), stem_width=45, temporal_kernels=(3, 3, 3, 3),
                 causal=False)


def local_stage1_step(config, batch, *, original: str, device: str):
  """One optimiser step of the original's stage-1 network on `batch` (a local_stage1 batch)."""
  import torch  # Only with --original: the project itself never needs torch.

  model_config = {key: tuple(v) if isinstance(v, (list, tuple)) else v
                  for key, v in config.model.items() if key in _RELEASED}
  if model_config != _RELEASED:
    raise errors.InputError(
        f'config.model: the original builds vidrn18_trck_reg only ({_RELEASED}), not '
        f'{model_config}; time the full recipe (configs/dualtrack/local_stage1.py)')
  path = os.path.abspath(original)
  if not os.path.isfile(os.path.join(path, 'src', 'models', 'local_encoder.py')):
    raise errors.InputError(f'--original={path}: src/models/local_encoder.py not found (not a '
                            'DualTrack checkout)')
  if path not in sys.path:
    sys.path.insert(0, path)
  from src.models import local_encoder  # pylint: disable=g-import-not-at-top

  module = local_encoder.vidrn18_trck_reg().train().to(device)
  images = torch.from_numpy(np.asarray(batch['images'], np.float32)[:, :, None] / 255.0)
  images = images.to(device)
  targets = torch.from_numpy(np.asarray(batch['targets'], np.float32)).to(device)
  o = config.optim
  optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(module(images).float(), targets)
    loss.backward()
    if o.get('grad_clip_norm'):
      torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip_norm)
    optimizer.step()

  return step


TORCH_TRAIN_STEPS = {'dualtrack_jax.experiments.local_stage1': local_stage1_step}
