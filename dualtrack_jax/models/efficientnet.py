"""EfficientNet-B1 as timm builds it (`timm.create_model('efficientnet_b1', ...)`), channels-last.

The 2-frame CNN baseline's backbone of the DualTrack README command (`train_2_frame_cnn.py
--model efficientnet_b1`: `in_chans=2, num_classes=6, drop_rate=0.25`, no pretrained weights) and
of the TUS-REC challenge baseline (torchvision's `efficientnet_b1(weights=None)` with a 2-channel
first conv: the same network in eval mode; torchvision adds stochastic depth 0.2, here
`drop_path`, and its dropout is 0.2).

Stem 3x3/2 conv (32) -> BN -> SiLU; seven stages of mobile inverted bottlenecks (B0's stages with
the depths scaled by 1.1, rounded up: 2, 3, 3, 4, 4, 5, 2 blocks); 1x1 conv to 1280 -> BN -> SiLU
-> global mean -> dropout -> linear. Every block has squeeze-excitation (reduction to a quarter of
the block's input channels) and a residual connection when its stride is 1 and its width is
unchanged. Padding is torch's symmetric k // 2 (not TensorFlow's "SAME" of the tf_ variants).
Batch norm is torch's (`resnet3d.batch_norm`: eps 1e-5, momentum 0.1, unbiased running variance).

Module names mirror timm's state dict, so conversion is `experiments/baselines.EFFICIENTNET`:
`blocks.3.1.conv_dw.weight` (C, 1, k, k) is Flax `blocks_3_1/conv_dw/kernel` (k, k, 1, C).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtrack_jax.models import resnet3d

# timm's `_gen_efficientnet` arch_def of B0: (block, repeats, kernel, stride, expansion, width);
# 'ds' is the depthwise-separable block, 'ir' the inverted residual.
B0_STAGES = (('ds', 1, 3, 1, 1, 16), ('ir', 2, 3, 2, 6, 24), ('ir', 2, 5, 2, 6, 40),
             ('ir', 3, 3, 2, 6, 80), ('ir', 3, 5, 1, 6, 112), ('ir', 4, 5, 2, 6, 192),
             ('ir', 1, 3, 1, 6, 320))
STEM_WIDTH = 32
HEAD_WIDTH = 1280
# timm's "goog" initialisation: conv N(0, 2 / fan_out) with fan_out = k * k * out / groups (for a
# depthwise kernel (k, k, 1, C) that is Flax's fan_in), linear U(+-1 / sqrt(out)), zero biases.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform')


def stage_depths(depth_multiplier: float) -> tuple[int, ...]:
  """Blocks per stage: B0's repeats scaled and rounded up (timm's depth_trunc='ceil')."""
  return tuple(math.ceil(r * depth_multiplier) for _, r, *_ in B0_STAGES)


def _conv(features: int, kernel: int, stride: int = 1, *, groups: int = 1, name: str,
          **kw) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((kernel // 2, kernel // 2),) * 2, feature_group_count=groups,
                 use_bias=False, kernel_init=_DEPTHWISE_INIT if groups > 1 else _CONV_INIT,
                 name=name, **kw)


class SqueezeExcite(nn.Module):
  """timm `SqueezeExcite`: x * sigmoid(conv_expand(silu(conv_reduce(mean_hw(x)))))."""
  reduced: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(kernel_init=_CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype)
    s = x.mean(axis=(1, 2), keepdims=True)
    s = nn.silu(nn.Conv(self.reduced, (1, 1), name='conv_reduce', **kw)(s))
    return x * jax.nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), name='conv_expand', **kw)(s))


class MBConv(nn.Module):
  """timm's `DepthwiseSeparableConv` (expansion 1) or `InvertedResidual` block.

  [conv_pw 1x1 -> bn1 -> SiLU] (expansion > 1 only) -> conv_dw kxk/stride -> BN -> SiLU -> SE ->
  1x1 projection -> BN, plus the input (after drop path) when stride 1 and width unchanged. BN
  names follow timm: bn1/bn2 in the depthwise-separable block, bn1/bn2/bn3 in the other.
  """
  features: int
  kernel: int
  stride: int
  expansion: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def bn(name):
      return resnet3d.batch_norm(train=train, name=name, **kw)

    inputs, width = x, x.shape[-1]
    separable = self.expansion == 1
    if not separable:
      width *= self.expansion
      x = nn.silu(bn('bn1')(_conv(width, 1, name='conv_pw', **kw)(x)))
    x = _conv(width, self.kernel, self.stride, groups=width, name='conv_dw', **kw)(x)
    x = nn.silu(bn('bn1' if separable else 'bn2')(x))
    x = SqueezeExcite(max(1, inputs.shape[-1] // 4), name='se', **kw)(x)
    x = _conv(self.features, 1, name='conv_pw' if separable else 'conv_pwl', **kw)(x)
    x = bn('bn2' if separable else 'bn3')(x)
    if self.stride == 1 and inputs.shape[-1] == self.features:
      # Stochastic depth: the whole residual branch of a sample is dropped (timm's DropPath).
      x = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """timm `EfficientNet` (width multiplier 1: B0 or B1) with a `num_outputs` linear head.

  Attributes:
    depth_multiplier: 1.1 for B1 (`efficientnet_b1`), 1.0 for B0.
    num_outputs: outputs of the classifier (6: a pose vector).
    dropout: before the classifier (the script's `drop_rate`).
    drop_path: stochastic depth of the last block; block i of n drops with drop_path * i / n.
  """
  depth_multiplier: float = 1.1
  num_outputs: int = 6
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, H, W, C) images -> (B, num_outputs) float32."""
    if x.ndim != 4:
      raise ValueError(f'EfficientNet: input must be (B, H, W, C), got shape {x.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(STEM_WIDTH, 3, 2, name='conv_stem', **kw)(x)
    x = nn.silu(resnet3d.batch_norm(train=train, name='bn1', **kw)(x))
    depths = stage_depths(self.depth_multiplier)
    index = 0
    for i, ((_, _, kernel, stride, expansion, width), depth) in enumerate(zip(B0_STAGES, depths)):
      for j in range(depth):
        x = MBConv(width, kernel, stride if j == 0 else 1, expansion,
                   self.drop_path * index / sum(depths), name=f'blocks_{i}_{j}', **kw)(x, train)
        index += 1
    x = _conv(HEAD_WIDTH, 1, name='conv_head', **kw)(x)
    x = nn.silu(resnet3d.batch_norm(train=train, name='bn2', **kw)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(jnp.float32).mean(axis=(1, 2)))
    return nn.Dense(self.num_outputs, kernel_init=_LINEAR_INIT, param_dtype=self.param_dtype,
                    name='classifier')(x)
