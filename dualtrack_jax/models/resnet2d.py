"""Per-frame 2D ResNet-18 of the DualTrack global encoder, channels-last.

Port of `video_rn18_no_temporal`: torchvision's `VideoResNet` built with `RStemNoTemporal` and
`Conv3DNoTemporal`, i.e. every kernel has temporal size 1 and the network is a 2D ResNet-18 applied
to each frame on its own, without a max-pool: 224 x 224 -> 14 x 14 x 512. Frames are folded into
the batch.

Module names mirror the PyTorch state dict as in `resnet3d.py`:
`global_encoder.backbone.0.backbone.stem.3.weight` (O, I, 1, kH, kW) is Flax path
`stem/3/kernel` (kH, kW, I, O) (squeeze the temporal axis, then transpose);
`...layer2.0.downsample.1.running_var` is `batch_stats` path `layer2/0/downsample/1/var`.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtrack_jax.models import resnet3d


class ImageStem(nn.Module):
  """`RStemNoTemporal`: 7x7 stride-2 conv, BN, ReLU, 3x3 conv, BN, ReLU (no max-pool).

  Children '0', '1', '3', '4' as in torch (indices 2 and 5 are the parameter-free ReLUs).
  """
  width: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn_kw = dict(train=train, folded=self.fold_batch_norm, **kw)
    x = resnet3d.conv(self.width, (7, 7), (2, 2), name='0', **kw)(x)
    x = nn.relu(resnet3d.batch_norm(name='1', **bn_kw)(x))
    x = resnet3d.conv(self.features, (3, 3), (1, 1), name='3', **kw)(x)
    return nn.relu(resnet3d.batch_norm(name='4', **bn_kw)(x))


class ImageResNet(nn.Module):
  """DualTrack's image ResNet-18 feature extractor without max-pool (11,195,319 parameters).

  Attributes:
    widths: channels of layer1..layer4 (the stem also outputs widths[0]).
    stem_width: channels of the stem's 7x7 conv.
    dtype: computation dtype (e.g. jnp.bfloat16); batch statistics are still computed in float32.
    param_dtype: parameter dtype.
    fold_batch_norm: inference with variables from `resnet3d.fold_batch_norm`.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 45
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (B, H, W, C) images to the layer4 feature map (B, H/16, W/16, widths[-1]).

    Args:
      x: images, channels-last; fold frames into the batch first.
      train: batch norm uses (and updates) batch statistics when True, running ones otherwise.
    """
    if x.ndim != 4:
      raise ValueError(f'ImageResNet: input must be (B, H, W, C), got shape {x.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, fold_batch_norm=self.fold_batch_norm)
    x = ImageStem(self.stem_width, self.widths[0], name='stem', **kw)(x, train)
    for i, width in enumerate(self.widths):
      x = resnet3d.ResLayer(width, (3, 3), 1 if i == 0 else 2, name=f'layer{i + 1}', **kw)(
          x, train)
    return x
