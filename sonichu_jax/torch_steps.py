"""SONICHU's training step in PyTorch, for `launch.benchmark --bench=train --original=timm`.

There is no released SONICHU code, so the step is that of the same network built from timm and
torch.nn (`benchmarks.torch_model`: timm's ViT, mmpose's classic head, the soft-argmax) with
torch.optim.AdamW: the head of the batch's task, the masked L1 loss on normalised coordinates
(`config.loss = 'l1'`), backward, gradient clipping at `config.optim.grad_clip_norm`, one update.
The optional heatmap term of ours (`config.heatmap_weight`, the :sim recipe) is not part of it.
"""
import numpy as np

from sonichu_jax import benchmarks
from sonichu_jax import tasks
from sonichu_jax.experiments import keypoints
from ultrasound_common import errors


def keypoints_step(config, batch, *, original: str, device: str):
  """One optimiser step of the timm network on `batch` (a keypoints experiment's batch)."""
  import torch  # Only with --original: the project itself never needs torch.

  if original != benchmarks.ORIGINAL:
    raise errors.InputError(f'--original={original!r}: SONICHU has no released code; use '
                            f'--original={benchmarks.ORIGINAL} (the same network from timm)')
  if config.loss != 'l1':
    raise errors.InputError(f"config.loss: the PyTorch step computes 'l1', not {config.loss!r}")
  task = tasks.TASK_NAMES[int(batch['task'][0])]
  model = keypoints.build_model(config)
  module = benchmarks.torch_model(model, benchmarks.random_variables(model, config.seed), task)
  module = module.train().to(device)
  k = tasks.get_task(task).num_keypoints
  images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2)))
  images = images.float().to(device)
  target = torch.from_numpy(np.asarray(batch['keypoints'][:, :k], np.float32)).to(device)
  mask = np.asarray(batch['visible'][:, :k], np.float32) * np.asarray(batch['weight'])[:, None]
  mask = torch.from_numpy(mask.astype(np.float32)).to(device)
  o = config.optim
  optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)

  def step():
    optimizer.zero_grad(set_to_none=True)
    per_point = (module(images).float() - target).abs().sum(-1)
    loss = (per_point * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    if o.get('grad_clip_norm'):
      torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip_norm)
    optimizer.step()

  return step


TORCH_TRAIN_STEPS = {'sonichu_jax.experiments.keypoints': keypoints_step}
