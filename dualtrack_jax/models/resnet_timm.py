"""timm's ResNet-10-T (`timm.create_model('resnet10t', ...)`), channels-last.

The default backbone of DualTrack's 2-frame CNN script (`train_2_frame_cnn.py --model resnet10`:
`resnet10t`, `in_chans=2, num_classes=6, drop_rate=0.25`, no pretrained weights).

A "tiered" deep stem (3x3/2 conv to 24, BN, ReLU, 3x3 conv to 32, BN, ReLU, 3x3 conv to 64, then
`bn1`, ReLU and a 3x3/2 max-pool), one `BasicBlock` per layer (64, 128, 256, 512; layers 2-4
stride 2) whose shortcut, where the shape changes, is timm's "avg down": a 2x2/2 average pool
(ceil mode, padding not counted) -> 1x1 conv -> BN; then the global mean, dropout and `fc`.
Convs, padding and BN are `resnet3d`'s (torch's symmetric k // 2, torch's BN statistics).

Module names mirror timm's state dict (`experiments/baselines.RESNET10T`): `conv1.3.weight` is Flax
`conv1/3/kernel`, `layer3.0.downsample.2.running_var` is `batch_stats` `layer3/0/downsample/2/var`.
"""
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer


class DeepStem(nn.Module):
  """timm's `stem_type='deep_tiered'` convs: children '0', '1', '3', '4', '6' as its Sequential."""
  widths: Sequence[int] = (24, 32, 64)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = resnet3d.conv(self.widths[0], (3, 3), (2, 2), name='0', **kw)(x)
    x = nn.relu(resnet3d.batch_norm(train=train, name='1', **kw)(x))
    x = resnet3d.conv(self.widths[1], (3, 3), (1, 1), name='3', **kw)(x)
    x = nn.relu(resnet3d.batch_norm(train=train, name='4', **kw)(x))
    return resnet3d.conv(self.widths[2], (3, 3), (1, 1), name='6', **kw)(x)


class AvgDownShortcut(nn.Module):
  """timm `downsample_avg`: AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) ->
  1x1 conv ('1') -> BN ('2')."""
  features: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.stride != 1:
      # Ceil mode: an odd size gets a last window of one row (column), averaged over it alone.
      pad = tuple((0, n % 2) for n in x.shape[1:3])
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)
    x = resnet3d.conv(self.features, (1, 1), (1, 1), name='1', **kw)(x)
    return resnet3d.batch_norm(train=train, name='2', **kw)(x)


class BasicBlock(nn.Module):
  """timm `BasicBlock`: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = resnet3d.conv(self.features, (3, 3), (self.stride,) * 2, name='conv1', **kw)(x)
    y = nn.relu(resnet3d.batch_norm(train=train, name='bn1', **kw)(y))
    y = resnet3d.conv(self.features, (3, 3), (1, 1), name='conv2', **kw)(y)
    y = resnet3d.batch_norm(train=train, name='bn2', **kw)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = AvgDownShortcut(self.features, self.stride, name='downsample', **kw)(x, train)
    return nn.relu(y + x)


class Layer(nn.Module):
  """A layer of resnet10t: a Sequential of one `BasicBlock`, child '0'."""
  features: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return BasicBlock(self.features, self.stride, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='0')(x, train)


class ResNet10T(nn.Module):
  """timm `resnet10t` with a `num_outputs` linear head (4,925,350 parameters for 2 -> 6).

  Attributes:
    widths: channels of layer1..layer4.
    stem_widths: channels of the stem's three convs (the last is widths[0] in timm).
    num_outputs: outputs of `fc`.
    dropout: before `fc` (the script's `drop_rate`).
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_widths: Sequence[int] = (24, 32, 64)
  num_outputs: int = 6
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, H, W, C) images -> (B, num_outputs) float32."""
    if x.ndim != 4:
      raise ValueError(f'ResNet10T: input must be (B, H, W, C), got shape {x.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = DeepStem(self.stem_widths, name='conv1', **kw)(x, train)
    x = nn.relu(resnet3d.batch_norm(train=train, name='bn1', **kw)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, width in enumerate(self.widths):
      x = Layer(width, 1 if i == 0 else 2, name=f'layer{i + 1}', **kw)(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(jnp.float32).mean(axis=(1, 2)))
    return transformer.torch_linear(self.num_outputs, x.shape[-1], name='fc',
                                    param_dtype=self.param_dtype)(x)


def zero_init_last(variables: dict[str, Any]) -> dict[str, Any]:
  """timm's `zero_init_last`: each block's `bn2` scale starts at 0, so every block starts as its
  shortcut. Applied to freshly initialised variables (`model.init`), as timm does."""
  flat = flax.traverse_util.flatten_dict(variables)
  flat = {k: jnp.zeros_like(v) if k[0] == 'params' and k[-2:] == ('bn2', 'scale') else v
          for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)
