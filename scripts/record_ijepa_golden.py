"""Records I-JEPA goldens with the original code and PyTorch (needs torch; never run in CI).

    python scripts/record_ijepa_golden.py --ijepa=/path/to/ijepa [--out=tests/fixtures/ijepa]

`--ijepa` is a checkout of github.com/facebookresearch/ijepa (commit 52c1ae9), imported from there
(never copied into this repository). Writes `--out`/golden.npz with:

- one training step of the original (`src/train.py::train_step`, float32, no autocast): a reduced
  encoder (`src.models.vision_transformer.VisionTransformer`, 48x48 input, 8 px patches: a 6x6
  grid, width 32, depth 2, 4 heads, LayerNorm eps 1e-6 as `vit_base`), its predictor
  (`vit_predictor`, width 16, depth 2, 4 heads) and a target encoder whose weights differ from the
  encoder's (so the test sees which one each part uses), all with seeded random weights; the masks
  of the original `MaskCollator` (4 targets, min_keep 4 for the small grid) for a batch of 3;
  `forward_target`, `forward_context` and `F.smooth_l1_loss` exactly as train.py composes them.
  Keys: `image` (B, H, W, 3) channels-last, `masks_enc`, `masks_pred` (lists stacked), `loss`,
  `encoder.<torch name>`, `predictor.<name>`, `target_encoder.<name>`, `grad.encoder.<name>`,
  `grad.predictor.<name>` (torch layouts).
- statistics of the original collator on the 16x16 grid with I-JEPA's block settings:
  `stats_b1_context` / `stats_b1_target` (kept tokens per call at batch 1: no truncation, 3000
  calls), `stats_b16_context` / `stats_b16_target` (after truncation to the batch's shortest, batch
  16, 400 calls), `stats_context_freq` / `stats_target_freq` (how often each patch is kept, over
  the batch-1 calls).
"""
import argparse
import copy
import os
import sys

import numpy as np


def randomise(module, seed: int) -> None:
  """Every parameter but the sin-cos tables gets seeded, well-scaled random values."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  state = module.state_dict()
  for key, value in state.items():
    shape = tuple(value.shape)
    if key.endswith('pos_embed'):
      continue
    if value.ndim == 1 and key.endswith('weight'):
      new = 1.0 + 0.2 * rng.standard_normal(shape)
    elif value.ndim <= 1 or key.endswith('mask_token'):
      new = 0.2 * rng.standard_normal(shape)
    else:
      new = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
    state[key] = torch.tensor(new, dtype=value.dtype)
  module.load_state_dict(state, strict=True)


def collator_stats(multiblock, torch) -> dict[str, np.ndarray]:
  """Token counts and per-patch frequencies of the original collator on the 16x16 grid."""
  def collator():
    return multiblock.MaskCollator(
        input_size=(256, 256), patch_size=16, enc_mask_scale=(0.85, 1.0),
        pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10,
        allow_overlap=False)
  torch.manual_seed(1)
  one = collator()
  context, target = [], []
  context_freq, target_freq = np.zeros(256), np.zeros(256)
  for _ in range(3000):
    _, enc, pred = one([0])
    context.append(enc[0].shape[1])
    target.append(pred[0].shape[1])
    context_freq[enc[0][0].numpy()] += 1
    for p in pred:
      target_freq[p[0].numpy()] += 1
  batch = collator()
  context16, target16 = [], []
  for _ in range(400):
    _, enc, pred = batch([0] * 16)
    context16.append(enc[0].shape[1])
    target16.append(pred[0].shape[1])
  return dict(stats_b1_context=np.array(context), stats_b1_target=np.array(target),
              stats_b16_context=np.array(context16), stats_b16_target=np.array(target16),
              stats_context_freq=context_freq / 3000, stats_target_freq=target_freq / 3000)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--ijepa', required=True, help='checkout of facebookresearch/ijepa')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures', 'ijepa'))
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.ijepa))
  import functools  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from src.masks import multiblock  # pylint: disable=g-import-not-at-top
  from src.masks.utils import apply_masks  # pylint: disable=g-import-not-at-top
  from src.models import vision_transformer as vit  # pylint: disable=g-import-not-at-top
  from src.utils.tensors import repeat_interleave_batch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  encoder = vit.VisionTransformer(img_size=[48], patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                  mlp_ratio=4, qkv_bias=True,
                                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  predictor = vit.vit_predictor(num_patches=36, embed_dim=32, predictor_embed_dim=16, depth=2,
                                num_heads=4)
  randomise(encoder, 1)
  randomise(predictor, 2)
  target_encoder = copy.deepcopy(encoder)
  randomise(target_encoder, 3)
  for p in target_encoder.parameters():
    p.requires_grad = False

  b = 3
  collate = multiblock.MaskCollator(
      input_size=(48, 48), patch_size=8, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
      aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=4, allow_overlap=False)
  torch.manual_seed(5)
  imgs = torch.randn(b, 3, 48, 48)
  _, masks_enc, masks_pred = collate([0] * b)

  # src/train.py::train_step, float32.
  with torch.no_grad():
    h = target_encoder(imgs)
    h = F.layer_norm(h, (h.size(-1),))
    h = apply_masks(h, masks_pred)
    h = repeat_interleave_batch(h, b, repeat=len(masks_enc))
  z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
  loss = F.smooth_l1_loss(z, h)
  loss.backward()

  out = dict(image=imgs.permute(0, 2, 3, 1).numpy(), loss=np.float32(loss.item()),
             masks_enc=torch.stack(masks_enc, 1).numpy(),
             masks_pred=torch.stack(masks_pred, 1).numpy())
  for name, module in (('encoder', encoder), ('predictor', predictor),
                       ('target_encoder', target_encoder)):
    for key, value in module.state_dict().items():
      out[f'{name}.{key}'] = value.numpy()
  for name, module in (('encoder', encoder), ('predictor', predictor)):
    for key, p in module.named_parameters():
      if p.grad is not None:  # The frozen sin-cos tables have none.
        out[f'grad.{name}.{key}'] = p.grad.numpy()
  out.update(collator_stats(multiblock, torch))
  os.makedirs(args.out, exist_ok=True)
  np.savez_compressed(os.path.join(args.out, 'golden.npz'), **out)
  print(f'loss {loss.item():.6f}; masks_enc {out["masks_enc"].shape}, masks_pred '
        f'{out["masks_pred"].shape}; wrote {len(out)} arrays to {args.out}/golden.npz')


if __name__ == '__main__':
  main()
