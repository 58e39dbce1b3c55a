"""Records SONICHU parity goldens with PyTorch, timm and the I-JEPA code (needs torch; not in CI).

    python scripts/record_sonichu_goldens.py --ijepa=/path/to/ijepa [--out=tests/fixtures/sonichu]

Needs torch, timm (with torchvision; a pure-Python copy of the wheel is enough, see
docs/dualtrack.md, section "Reference environment"), safetensors and numpy. `--ijepa` is a
checkout of github.com/facebookresearch/ijepa, imported from there (never copied into this
repository).

Reduced models (patch 16, width 32, depth 2, 2 heads; heads of 16 filters) with seeded random
weights, float32, eval mode, `torch.no_grad()`. Written to `--out`:

- timm_vit.safetensors: timm VisionTransformer(class_token=False, global_pool='') at 64x64, written
  by the `safetensors` package (so the tests read the official writer's format).
- timm_cls.safetensors: a depth-1 timm ViT with class token and classifier at 48x48 (grid 3x3), for
  the class-token drop and the position-table resampling to 4x4.
- ijepa.pth: an I-JEPA training checkpoint ({'encoder', 'predictor', 'target_encoder', ...}, DDP's
  `module.` prefixes) of the I-JEPA repository's own VisionTransformer (fixed sin-cos table).
- vitpose.pth: an mmpose checkpoint ({'meta', 'state_dict'}) of a ViTPose model: the mmpose ViT
  (patch conv padded by 2, class-token slot added to every position, `last_norm`) rebuilt from
  timm's blocks, and a `TopdownHeatmapSimpleHead` rebuilt from torch.nn with mmpose's names, K = 2,
  64x48 input.
- sonichu_tiny.safetensors: the SONICHU layout (`backbone.` timm names, `heads.{task}.` mmpose
  names) with heads for FUGC (K = 2) and HC (K = 4).
- timm_vit_b16_256_keys.json: names and shapes of the full-size backbone (timm's ViT-B/16 at 256x256
  without class token), for the naming test at full size without weights.
- goldens.npz: inputs and outputs, channels-last (see `main` for the names).
"""
import argparse
import functools
import json
import os
import sys

import numpy as np

HC_FLIP_PAIRS = ((0, 1), (2, 3))  # sonichu_jax/tasks.py's HC pairs; FUGC has none.


def randomise(module, seed: int, keep: tuple[str, ...] = ()) -> None:
  """Fills every parameter and buffer but `keep` with seeded, well-scaled random values."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  state = module.state_dict()
  for key, value in state.items():
    shape = tuple(value.shape)
    if key.endswith('num_batches_tracked') or key in keep:
      continue
    if key.endswith('running_var'):
      new = rng.uniform(0.5, 1.5, shape)
    elif value.ndim == 1 and key.endswith('weight'):  # LayerNorm / BatchNorm scales.
      new = 1.0 + 0.2 * rng.standard_normal(shape)
    elif value.ndim <= 1 or key.endswith('pos_embed') or key.endswith('cls_token'):
      new = 0.2 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[1:])) if 'deconv' not in key else shape[0] * 4
      new = rng.standard_normal(shape) / np.sqrt(fan_in)
    state[key] = torch.tensor(new, dtype=value.dtype)
  module.load_state_dict(state, strict=True)


def soft_argmax(torch, heatmaps, temperature: float):
  """(B, K, H, W) logits -> (B, K, 2) expected pixel-centre (x, y) / (W, H)."""
  b, k, h, w = heatmaps.shape
  p = torch.softmax(heatmaps.reshape(b, k, h * w) / temperature, dim=-1).reshape(b, k, h, w)
  xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
  ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
  return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1)


def vitpose_head(torch, in_dim: int, filters: int, k: int):
  """mmpose TopdownHeatmapSimpleHead (2 deconvs, kernel 4, final_conv_kernel=1), with its names."""
  nn = torch.nn
  head = nn.Module()
  head.deconv_layers = nn.Sequential(
      nn.ConvTranspose2d(in_dim, filters, 4, stride=2, padding=1, output_padding=0, bias=False),
      nn.BatchNorm2d(filters), nn.ReLU(),
      nn.ConvTranspose2d(filters, filters, 4, stride=2, padding=1, output_padding=0, bias=False),
      nn.BatchNorm2d(filters), nn.ReLU())
  head.final_layer = nn.Conv2d(filters, k, 1)
  head.forward = lambda x: head.final_layer(head.deconv_layers(x))
  return head


def nhwc(t) -> np.ndarray:
  return t.permute(0, 2, 3, 1).contiguous().numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ijepa', required=True, help='checkout of facebookresearch/ijepa')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures', 'sonichu'))
  args = parser.parse_args()
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, args.ijepa)
  from src.models import vision_transformer as ijepa_vit  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.set_num_threads(1)
  os.makedirs(args.out, exist_ok=True)
  out = {}
  dims = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
  x = torch.from_numpy(images)
  out['images'] = images.transpose(0, 2, 3, 1)

  with torch.no_grad():
    # timm ViT without class token: the SONICHU backbone.
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, class_token=False, global_pool='', num_classes=0, **dims).eval()
    randomise(vit, 10)
    safetensors.torch.save_file(vit.state_dict(), os.path.join(args.out, 'timm_vit.safetensors'))
    tokens = vit.forward_features(x)
    out['timm/features'] = tokens.reshape(2, 4, 4, 32).numpy()

    full = timm.models.vision_transformer.VisionTransformer(
        img_size=256, class_token=False, global_pool='', num_classes=0)
    with open(os.path.join(args.out, 'timm_vit_b16_256_keys.json'), 'w') as f:
      json.dump({k: list(v.shape) for k, v in full.state_dict().items()}, f, indent=0)
    del full

    # timm ViT with class token and classifier at 48x48: class slot dropped, table resampled.
    vit_cls = timm.models.vision_transformer.VisionTransformer(
        img_size=48, num_classes=5, **{**dims, 'depth': 1}).eval()
    randomise(vit_cls, 11)
    safetensors.torch.save_file(vit_cls.state_dict(),
                                os.path.join(args.out, 'timm_cls.safetensors'))
    out['timm_cls/pos_embed_4x4'] = resample_abs_pos_embed(
        vit_cls.pos_embed, [4, 4], num_prefix_tokens=1)[:, 1:].numpy()
    # A shrinking, non-square resampling (antialiased), on its own.
    table = torch.from_numpy(rng.standard_normal((1, 25, 32)).astype(np.float32))
    out['resample/src_5x5'] = table.numpy()
    out['resample/dst_4x3'] = resample_abs_pos_embed(table, [4, 3], old_size=[5, 5],
                                                     num_prefix_tokens=0).numpy()

    # I-JEPA's own encoder, saved as its training loop does (DDP module. prefix).
    make = functools.partial(ijepa_vit.VisionTransformer, img_size=[64], qkv_bias=True,
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **dims)
    target, context = make().eval(), make().eval()
    randomise(target, 20, keep=('pos_embed',))  # I-JEPA's fixed sin-cos table stays.
    randomise(context, 21, keep=('pos_embed',))
    sincos = ijepa_vit.get_2d_sincos_pos_embed(32, 4)
    out['ijepa/sincos_pos_embed'] = sincos[None].astype(np.float32)
    assert np.array_equal(target.pos_embed.numpy(), out['ijepa/sincos_pos_embed'])
    prefixed = lambda m: {'module.' + k: v for k, v in m.state_dict().items()}  # noqa: E731
    predictor = ijepa_vit.vit_predictor(num_patches=16, embed_dim=32, predictor_embed_dim=16,
                                        depth=1, num_heads=2)
    torch.save({'encoder': prefixed(context), 'predictor': prefixed(predictor),
                'target_encoder': prefixed(target), 'opt': None, 'scaler': None, 'epoch': 3,
                'loss': 0.25, 'batch_size': 2, 'world_size': 1, 'lr': 1e-3},
               os.path.join(args.out, 'ijepa.pth'))
    out['ijepa/features_target'] = target(x).reshape(2, 4, 4, 32).numpy()
    out['ijepa/features_encoder'] = context(x).reshape(2, 4, 4, 32).numpy()

    # ViTPose (mmpose layout) at 64x48: patch conv padding 2, pos_embed with a class slot.
    vp = timm.models.vision_transformer.VisionTransformer(
        img_size=(64, 48), num_classes=0, global_pool='', **dims).eval()
    randomise(vp, 30)
    head = vitpose_head(torch, 32, 16, 2).eval()
    randomise(head, 31)
    pose_images = rng.standard_normal((2, 3, 64, 48)).astype(np.float32)
    xp = torch.from_numpy(pose_images)
    feats = F.conv2d(xp, vp.patch_embed.proj.weight, vp.patch_embed.proj.bias, stride=16, padding=2)
    gh, gw = feats.shape[2:]
    tokens = feats.flatten(2).transpose(1, 2) + vp.pos_embed[:, 1:] + vp.pos_embed[:, :1]
    tokens = vp.norm(vp.blocks(tokens))
    feats = tokens.transpose(1, 2).reshape(2, 32, gh, gw)
    out['vitpose/images'] = pose_images.transpose(0, 2, 3, 1)
    out['vitpose/features'] = nhwc(feats)
    out['vitpose/heatmaps'] = nhwc(head(feats))
    backbone = {k: v for k, v in vp.state_dict().items() if k != 'cls_token'}
    backbone = {('last_norm.' + k[5:] if k.startswith('norm.') else k): v
                for k, v in backbone.items()}
    state = {**{'backbone.' + k: v for k, v in backbone.items()},
             **{'keypoint_head.' + k: v for k, v in head.state_dict().items()}}
    torch.save({'meta': {'mmpose_version': '0.24.0'}, 'state_dict': state},
               os.path.join(args.out, 'vitpose.pth'))

    # SONICHU layout: the timm backbone and one head per task.
    heads = {'FUGC': vitpose_head(torch, 32, 16, 2).eval(),
             'HC': vitpose_head(torch, 32, 16, 4).eval()}
    randomise(heads['FUGC'], 40)
    randomise(heads['HC'], 41)
    state = {'backbone.' + k: v for k, v in vit.state_dict().items()}
    for task, h in heads.items():
      state.update({f'heads.{task}.{k}': v for k, v in h.state_dict().items()})
    safetensors.torch.save_file(state, os.path.join(args.out, 'sonichu_tiny.safetensors'))

    def predict(task, inputs, temperature):
      fmap = vit.forward_features(inputs).transpose(1, 2).reshape(inputs.shape[0], 32, 4, 4)
      hm = heads[task](fmap)
      return hm, soft_argmax(torch, hm, temperature)

    for task, pairs in (('FUGC', ()), ('HC', HC_FLIP_PAIRS)):
      hm, coords = predict(task, x, 1.0)
      out[f'sonichu/heatmaps_{task}'] = nhwc(hm)
      out[f'sonichu/coords_{task}'] = coords.numpy()
      out[f'sonichu/coords_{task}_t0.25'] = predict(task, x, 0.25)[1].numpy()
      mirrored = predict(task, torch.flip(x, dims=[3]), 1.0)[1]
      back = torch.stack([1.0 - mirrored[..., 0], mirrored[..., 1]], dim=-1)
      perm = list(range(back.shape[1]))
      for a, b in pairs:
        perm[a], perm[b] = b, a
      out[f'sonichu/tta_{task}'] = (0.5 * (coords + back[:, perm])).numpy()

    # Preprocessing: bilinear, half-pixel centres, no antialias (= cv2.INTER_LINEAR), ImageNet norm.
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    for name, shape in (('down', (37, 53, 3)), ('up', (9, 7))):
      image = rng.integers(0, 256, shape, dtype=np.uint8)
      t = torch.from_numpy(image.astype(np.float32) / 255.0)
      t = (t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]).expand(1, 3, *shape[:2])
      resized = F.interpolate(t, size=(24, 24), mode='bilinear', align_corners=False,
                              antialias=False)
      out[f'preprocess/image_{name}'] = image
      out[f'preprocess/out_{name}'] = nhwc((resized - mean) / std)[0]

  out['versions'] = np.array(f'torch {torch.__version__}, timm {timm.__version__}')
  np.savez_compressed(os.path.join(args.out, 'goldens.npz'), **out)
  for name in sorted(os.listdir(args.out)):
    print(f'{name}: {os.path.getsize(os.path.join(args.out, name)):,} bytes')


if __name__ == '__main__':
  main()
