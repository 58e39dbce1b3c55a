"""SONICHU's training steps in PyTorch, for `launch.benchmark --bench=train --original=...`.

Keypoints (`--original=timm`): there is no released SONICHU code, so the step is that of the same
network built from timm and torch.nn (`benchmarks.torch_model`: timm's ViT, mmpose's classic head,
the soft-argmax) with torch.optim.AdamW: the head of the batch's task, the masked L1 loss on
normalised coordinates (`config.loss = 'l1'`), backward, gradient clipping at
`config.optim.grad_clip_norm`, one update. The optional heatmap term of ours
(`config.heatmap_weight`, the :sim recipe) is not part of it.

I-JEPA (`--original=PATH`, a checkout of facebookresearch/ijepa): the official `train_step` of
`src/train.py` on the official modules (`src/models/vision_transformer.py`: the encoder, its deep
copy as the target encoder, `vit_predictor`'s predictor) and optimiser (`src/helper.py::init_opt`:
AdamW, its parameter groups and the lr and weight-decay schedules), at the config's sizes, on our batch's
images and masks (each index list cut to the batch's shortest, as the official collator does):
schedules stepped, target features (no grad, LayerNorm, the target blocks), context encoder and
predictor, smooth-L1, backward, update, EMA of the target encoder.
"""
import copy
import functools
import os
import sys

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


def _index_lists(index: np.ndarray, valid: np.ndarray, torch) -> list:
  """(B, [M,] K) padded indices -> per block a (B, k) LongTensor cut to the batch's shortest."""
  index, valid = index.reshape(index.shape[0], -1, index.shape[-1]), valid.reshape(
      valid.shape[0], -1, valid.shape[-1])
  lists = []
  for m in range(index.shape[1]):
    k = int(valid[:, m].sum(axis=-1).min())
    rows = [index[b, m][valid[b, m]][:k] for b in range(index.shape[0])]
    lists.append(torch.from_numpy(np.stack(rows).astype(np.int64)))
  return lists


def ijepa_step(config, batch, *, original: str, device: str):
  """One official I-JEPA train step (module docstring) on `batch` (an I-JEPA experiment's)."""
  root = os.path.abspath(os.path.expanduser(original))
  if not os.path.isfile(os.path.join(root, 'src', 'models', 'vision_transformer.py')):
    raise errors.InputError(f'--original={original!r}: not a checkout of facebookresearch/ijepa '
                            '(no src/models/vision_transformer.py there)')
  if config.frozen_target.get('workdir'):
    raise errors.InputError('config.frozen_target.workdir: the official step has no frozen '
                            'target; benchmark the EMA recipe')
  import torch  # Only with --original: the project itself never needs torch.
  import torch.nn.functional as F  # pylint: disable=invalid-name
  sys.path.insert(0, root)
  from src import helper  # pylint: disable=g-import-not-at-top
  from src.masks.utils import apply_masks  # pylint: disable=g-import-not-at-top
  from src.models import vision_transformer as vit  # pylint: disable=g-import-not-at-top
  from src.utils.tensors import repeat_interleave_batch  # pylint: disable=g-import-not-at-top

  m, p, o = config.model, config.predictor, config.optim
  size = int(config.data.image_size)
  encoder = vit.VisionTransformer(
      img_size=[size], patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).to(device)
  # `vit_predictor`'s module with the config's MLP ratio (vit_predictor fixes it at 4).
  predictor = vit.VisionTransformerPredictor(
      num_patches=(size // m.patch_size) ** 2, embed_dim=m.embed_dim,
      predictor_embed_dim=p.dim, depth=p.depth, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio,
      qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).to(device)
  target_encoder = copy.deepcopy(encoder)
  for param in target_encoder.parameters():
    param.requires_grad = False
  optimizer, _, scheduler, wd_scheduler = helper.init_opt(
      encoder, predictor, iterations_per_epoch=1000, start_lr=o.start_lr, ref_lr=o.lr,
      warmup=1, num_epochs=100, wd=o.weight_decay, final_wd=o.final_weight_decay,
      final_lr=o.final_lr)
  momentum = float(config.ema[0])
  images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2)))
  images = images.float().to(device)
  masks_enc = [t.to(device) for t in _index_lists(batch['context_index'],
                                                  batch['context_valid'], torch)]
  masks_pred = [t.to(device) for t in _index_lists(batch['target_index'],
                                                   batch['target_valid'], torch)]

  def step():
    scheduler.step()
    wd_scheduler.step()
    with torch.no_grad():
      h = target_encoder(images)
      h = F.layer_norm(h, (h.size(-1),))
      h = repeat_interleave_batch(apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
    z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
    F.smooth_l1_loss(z, h).backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
      for q, k in zip(encoder.parameters(), target_encoder.parameters()):
        k.data.mul_(momentum).add_((1.0 - momentum) * q.detach().data)

  return step


TORCH_TRAIN_STEPS = {'sonichu_jax.experiments.keypoints': keypoints_step,
                     'sonichu_jax.experiments.ijepa': ijepa_step}
