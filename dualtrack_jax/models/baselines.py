"""The published tracking methods that the DualTrack paper compares with, channels-last.

The original's `scripts/baselines/` (docs/dualtrack.md, section "Baselines"):

| module              | method                    | input -> output                                |
|---------------------|---------------------------|------------------------------------------------|
| `PrevostConvNet`    | 2-frame CNN, Prevost 2018 | (B, H, W, 2) stacked frame pair -> (B, 6)      |
| `MoNet`             | MoNet, Luo 2023 (images)  | (B, N, H, W) frames -> (B, N - 1, 6)           |
| `DCLNet`            | DCLNet, Guo 2020          | (B, 5, H, W) clip -> (B, 6), the clip's mean   |
| `HybridTransformer` | Ning 2022                 | (B, N, H, W) frames -> (B, N - 1, 6)           |

The 2-frame CNN's other backbones are timm's networks, in their own modules:
`efficientnet.EfficientNet` (`efficientnet_b1`) and `resnet_timm.ResNet10T` (`resnet10t`).

Module names mirror the original's state dicts (`conv1`, `fc1`, ...), so converting a checkpoint is
a key rename plus the kernel transposes of `dualtrack_jax/convert.py` (tables in
`experiments/baselines.py`).
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer

# torch's default Conv2d initialisation (kaiming_uniform_(a=sqrt(5)) = variance scaling 1/3).
_TORCH_CONV_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _torch_bias_init(fan_in: int):
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_conv2d(features: int, kernel: int, stride: int, fan_in: int, *, name: str,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Conv:
  """torch Conv2d with bias, symmetric zero padding kernel // 2 and torch's initialisation."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((kernel // 2, kernel // 2),) * 2, kernel_init=_TORCH_CONV_INIT,
                 bias_init=_torch_bias_init(fan_in * kernel * kernel), dtype=dtype,
                 param_dtype=param_dtype, name=name)


class PrevostConvNet(nn.Module):
  """`Prevost2018ConvNet` of the 2-frame baseline: the motion between two stacked frames.

  conv 5x5/2 -> conv 5x5/2 -> max-pool 2 -> conv 3x3/2 -> conv 3x3/2 -> max-pool 2 (64 channels,
  ReLU after each conv, then the optional norm) -> flatten -> FC 512 -> ReLU -> FC 6, dropout after
  each pooled stage and FC 512. The original's input is 128 x 128 (its `input_size`, a 2 x 2 x 64
  feature map); `fc1` here takes whatever the frames give.

  With norm='batch' each conv has its own BatchNorm (`norm1`..`norm4`): the original's forward
  reuses norm1 and norm2 after conv3 and conv4 (its norm3 and norm4 are never used), a bug not
  reproduced here; norm=None (the README's `prevostnet`) is exact.

  Attributes:
    norm: None or 'batch'.
    dropout: drop probability.
  """
  norm: str | None = None
  dropout: float = 0.25
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, H, W, C) stacked frames -> (B, 6) pose vector of frame 2 relative to frame 1."""
    if x.ndim != 4:
      raise ValueError(f'PrevostConvNet: input must be (B, H, W, C), got shape {x.shape}')
    if self.norm not in (None, 'batch'):
      raise ValueError(f"PrevostConvNet: norm must be None or 'batch', got {self.norm!r}")
    if min(x.shape[1:3]) < 64:
      raise ValueError(f'PrevostConvNet: frames of {x.shape[1]}x{x.shape[2]} leave no feature map '
                       '(it downsamples 64x); use crops of at least 64x64')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    for i, (kernel, pool) in enumerate(((5, False), (5, True), (3, False), (3, True))):
      x = nn.relu(torch_conv2d(64, kernel, 2, x.shape[-1], name=f'conv{i + 1}', **kw)(x))
      if self.norm == 'batch':
        x = resnet3d.batch_norm(train=train, name=f'norm{i + 1}', **kw)(x)
      if pool:
        x = nn.max_pool(drop(x), (2, 2), strides=(2, 2))
    # Flattened in torch's (C, H, W) order, so that fc1 is the original's weight transposed.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = drop(nn.relu(transformer.torch_linear(512, x.shape[-1], name='fc1', **kw)(x)))
    return transformer.torch_linear(6, 512, name='fc2', param_dtype=self.param_dtype)(
        x.astype(jnp.float32))


class TorchLSTM(nn.Module):
  """torch.nn.LSTM(batch_first=True) with its parameters, names and numerics, as a `lax.scan`.

  Parameters per layer k as torch's state dict: weight_ih_l{k} (4H, I), weight_hh_l{k} (4H, H),
  bias_ih_l{k}, bias_hh_l{k} (4H,), gates stacked in torch's order i, f, g, o; zero initial state;
  c' = f c + i g, h' = o tanh(c'). Initialised as torch: U(-1/sqrt(H), 1/sqrt(H)).
  """
  hidden: int
  num_layers: int = 1
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, N, I) -> (B, N, H) hidden states of the last layer."""
    bound = 1.0 / self.hidden ** 0.5

    def init(key, shape, dtype):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    h4 = 4 * self.hidden
    x = x.astype(jnp.float32)
    for k in range(self.num_layers):
      w_ih = self.param(f'weight_ih_l{k}', init, (h4, x.shape[-1]), self.param_dtype)
      w_hh = self.param(f'weight_hh_l{k}', init, (h4, self.hidden), self.param_dtype)
      b_ih = self.param(f'bias_ih_l{k}', init, (h4,), self.param_dtype)
      b_hh = self.param(f'bias_hh_l{k}', init, (h4,), self.param_dtype)
      # The input projection of every step at once; only the recurrent product is sequential.
      projected = jnp.einsum('bni,gi->nbg', x, w_ih.astype(jnp.float32)) + b_ih + b_hh

      def step(carry, xp, w_hh=w_hh):
        h, c = carry
        i, f, g, o = jnp.split(xp + h @ w_hh.astype(jnp.float32).T, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

      zeros = jnp.zeros((x.shape[0], self.hidden), jnp.float32)
      _, hs = jax.lax.scan(step, (zeros, zeros), projected)
      x = jnp.swapaxes(hs, 0, 1)
    return x


class MoNet(nn.Module):
  """MoNet image-only, as DualTrack reproduces it (`run_monet_baseline.py::ResnetLSTM`).

  A causal video ResNet-18 whose only temporal conv is the stem's (frames t - 1 and t:
  `causal_video_rn18_2_frames`), the spatial mean, a 4-layer LSTM (512 -> 256) and a linear head;
  output k + 1 (the first is dropped) is the motion from frame k to frame k + 1. No IMU branch and
  no online self-supervised refinement of the published MoNet.

  Attributes:
    widths, stem_width: of the video ResNet (`resnet3d.VideoResNet`).
    lstm_hidden, lstm_layers: of the LSTM.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 45
  lstm_hidden: int = 256
  lstm_layers: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.resnet = resnet3d.VideoResNet(self.widths, self.stem_width, (1,) * len(self.widths),
                                       dtype=self.dtype, param_dtype=self.param_dtype,
                                       causal=True)
    self.lstm = TorchLSTM(self.lstm_hidden, self.lstm_layers, param_dtype=self.param_dtype)
    self.fc = transformer.torch_linear(6, self.lstm_hidden, name=None,
                                       param_dtype=self.param_dtype)

  @property
  def temporal_radius(self) -> int:
    """Frames before frame t that its CNN features depend on (1: the causal stem)."""
    return resnet3d.VideoResNet(self.widths, temporal_kernels=(1,) * len(self.widths),
                                causal=True).temporal_radius

  def features(self, frames: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, N, H, W) frames -> (B, N, widths[-1]) spatially averaged CNN features (float32).

    Frame t's features depend on frames t - 1 and t only (`temporal_radius`), so long sweeps can
    be tiled exactly (`tiling.tiled_temporal_apply`).
    """
    if frames.ndim != 4:
      raise ValueError(f'MoNet: input must be (B, N, H, W) frames, got shape {frames.shape}')
    return self.resnet(frames[..., None], train=train).astype(jnp.float32).mean(axis=(2, 3))

  def head(self, features: jax.Array) -> jax.Array:
    """(B, N, C) features -> (B, N - 1, 6): the LSTM over the whole sequence, the first dropped."""
    return self.fc(self.lstm(features))[:, 1:]

  def __call__(self, frames: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, N, H, W) frames -> (B, N - 1, 6) relative pose vectors."""
    return self.head(self.features(frames, train=train))


def _conv3d(features: int, kernel: Sequence[int], strides: Sequence[int], *, groups: int = 1,
            use_bias: bool = False, name: str, dtype: Any, param_dtype: Any) -> nn.Conv:
  """torch Conv3d with symmetric zero padding k // 2 (temporal strides too, unlike FrameConv)."""
  return nn.Conv(features, tuple(kernel), strides=tuple(strides),
                 padding=tuple((k // 2, k // 2) for k in kernel), feature_group_count=groups,
                 use_bias=use_bias, kernel_init=nn.initializers.variance_scaling(
                     2.0, 'fan_out', 'normal'), dtype=dtype, param_dtype=param_dtype, name=name)


class ResNeXtBottleneck(nn.Module):
  """`guo_et_al_resnext.ResNeXtBottleneck` (expansion 2): 1x1x1, grouped 3x3x3, 1x1x1 convs.

  The stride applies to time as well as space (the original's `stride=2` of layers 2-4), and the
  shortcut is a strided 1x1x1 conv + BN ('B' shortcut) where the shape changes.
  """
  planes: int
  cardinality: int
  stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mid = self.cardinality * (self.planes // 32)
    out = 2 * self.planes
    strides = (self.stride,) * 3

    def bn(name):
      return resnet3d.batch_norm(train=train, name=name, **kw)

    y = nn.relu(bn('bn1')(_conv3d(mid, (1, 1, 1), (1, 1, 1), name='conv1', **kw)(x)))
    y = _conv3d(mid, (3, 3, 3), strides, groups=self.cardinality, name='conv2', **kw)(y)
    y = nn.relu(bn('bn2')(y))
    y = bn('bn3')(_conv3d(out, (1, 1, 1), (1, 1, 1), name='conv3', **kw)(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = _conv3d(out, (1, 1, 1), strides, name='downsample_0', **kw)(x)
      x = resnet3d.batch_norm(train=train, name='downsample_1', **kw)(x)
    return nn.relu(y + x)


class DCLNet(nn.Module):
  """DCLNet of Guo et al. 2020 (`guo_et_al_resnext.GuoEtAlTrackingEstimator`): 3D ResNeXt-50.

  A 1-channel (3, 7, 7) stride (1, 2, 2) stem, BN, ReLU, a (1, 3, 3) stride (1, 2, 2) max-pool,
  four layers of `ResNeXtBottleneck`s (layers 2-4 stride 2 in time and space), the self-attention
  gate on the last map (BN -> 1x1x1 conv -> ReLU -> 1x1x1 conv to one channel -> BN -> sigmoid,
  multiplied in), ReLU, the mean over time and space and `fc` to the 6-vector. The original's
  unused `conv2` (2048 -> 128) has no counterpart here (`experiments/baselines.DCLNET_UNUSED`).
  The defaults are the original's; the :sim config narrows them.

  Attributes:
    layers: bottleneck blocks per layer.
    widths: `planes` of each layer (outputs 2x), and the gate's hidden width is widths[-1].
    cardinality: groups of the 3x3x3 convs.
    stem_width: channels of the stem.
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (128, 256, 512, 1024)
  cardinality: int = 32
  stem_width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, T, H, W) clips (T = 5 in the original) -> (B, 6) pose vectors."""
    if clips.ndim != 4:
      raise ValueError(f'DCLNet: input must be (B, T, H, W) clips, got shape {clips.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv3d(self.stem_width, (3, 7, 7), (1, 2, 2), name='conv1', **kw)(clips[..., None])
    x = nn.relu(resnet3d.batch_norm(train=train, name='bn1', **kw)(x))
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding=((0, 0), (1, 1), (1, 1)))
    for i, (blocks, planes) in enumerate(zip(self.layers, self.widths)):
      for j in range(blocks):
        x = ResNeXtBottleneck(planes, self.cardinality, 2 if i and not j else 1,
                              name=f'layer{i + 1}_{j}', **kw)(x, train)
    a = resnet3d.batch_norm(train=train, name='attention_0', **kw)(x)
    a = nn.relu(_conv3d(self.widths[-1], (1, 1, 1), (1, 1, 1), use_bias=True,
                        name='attention_1', **kw)(a))
    a = _conv3d(1, (1, 1, 1), (1, 1, 1), use_bias=True, name='attention_3', **kw)(a)
    a = jax.nn.sigmoid(resnet3d.batch_norm(train=train, name='attention_4', **kw)(a))
    x = nn.relu(x * a).astype(jnp.float32).mean(axis=(1, 2, 3))
    return transformer.torch_linear(6, x.shape[-1], name='fc', param_dtype=self.param_dtype)(x)


class HybridTransformer(nn.Module):
  """The hybrid transformer of Ning et al. 2022 (`run_ning_et_al_reprod.py::NingEtAlModel`).

  Per-frame features of the causal small-window video ResNet-18 (`backbone`: the stem sees frames
  t - 1 and t, layer1 t - 2 .. t twice more; `vidrn18_small_window_trck_reg_causal`), spatially
  averaged, -> Linear without bias (`proj`) + learned absolute positions (`pos_emb`, frame
  index 0 .. N - 1 < max_positions) -> HF BERT encoder (post-LN, exact GELU, FFN 2 x hidden) ->
  Linear to the 6-vector (`head`), the first output dropped. `features` (B, N, widths[-1]) can
  replace the frames: the two-stage variant trains the transformer on cached CNN features.

  Attributes:
    widths, stem_width: of the video ResNet; its temporal kernels are (3, 1, 1, 1), causal.
    hidden: transformer width (the README's --hidden_size 128; the script's default 512).
    num_layers, num_heads: of the BERT encoder (HF defaults 12 and the script's 8).
    max_positions: rows of the position table (1024): the longest sweep.
    dropout: BERT's hidden and attention dropout.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 45
  hidden: int = 128
  num_layers: int = 12
  num_heads: int = 8
  max_positions: int = 1024
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.backbone = resnet3d.VideoResNet(self.widths, self.stem_width,
                                         (3,) + (1,) * (len(self.widths) - 1), causal=True, **kw)
    self.proj = transformer.torch_linear(self.hidden, self.widths[-1], use_bias=False,
                                         name=None, **kw)
    self.pos_emb = nn.Embed(self.max_positions, self.hidden,
                            embedding_init=nn.initializers.normal(1.0),  # torch's N(0, 1)
                            param_dtype=self.param_dtype)
    self.transformer = transformer.BertEncoder(self.num_layers, self.num_heads, 2 * self.hidden,
                                               dropout=self.dropout, **kw)
    self.head = transformer.torch_linear(6, self.hidden, name=None,
                                         param_dtype=self.param_dtype)

  @property
  def temporal_radius(self) -> int:
    """Frames before frame t that its CNN features depend on."""
    return resnet3d.VideoResNet(self.widths, temporal_kernels=(3,) + (1,) * (len(self.widths) - 1),
                                causal=True).temporal_radius

  def features(self, frames: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, N, H, W) frames -> (B, N, widths[-1]) spatially averaged CNN features (float32)."""
    if frames.ndim != 4:
      raise ValueError(f'HybridTransformer: frames must be (B, N, H, W), got shape {frames.shape}')
    return self.backbone(frames[..., None], train=train).astype(jnp.float32).mean(axis=(2, 3))

  def sequence(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, N, C) CNN features -> (B, N - 1, 6) relative pose vectors."""
    n = features.shape[1]
    if n > self.max_positions:
      raise ValueError(f'HybridTransformer: {n} frames exceed the {self.max_positions} learned '
                       'positions (model.max_positions)')
    x = self.proj(features.astype(self.dtype)) + self.pos_emb(jnp.arange(n))[None]
    x = self.transformer(x, deterministic=not train)
    return self.head(x.astype(jnp.float32))[:, 1:]

  def __call__(self, frames: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, N, H, W) frames -> (B, N - 1, 6) relative pose vectors."""
    return self.sequence(self.features(frames, train=train), train=train)
