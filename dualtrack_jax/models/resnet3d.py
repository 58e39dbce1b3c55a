"""3D video ResNet-18 of the DualTrack local encoder, channels-last.

The network keeps every frame (temporal stride 1) and zero-pads the time axis at the sweep ends, so
output frame t depends on input frames t - r .. t + r with r = `VideoResNet.temporal_radius` (17 for
the released "large window" network, 5 for the small-window registry variant).

Module names mirror the PyTorch state dict (torchvision `VideoResNet` with the DualTrack stem):
torch key `stem.3.weight` is Flax path `stem/3/kernel`, `layer2.0.downsample.1.running_mean` is
`batch_stats` path `layer2/0/downsample/1/mean`, so converting a checkpoint is a key rename plus the
kernel transpose (O, I, kT, kH, kW) -> (kT, kH, kW, I, O).

`conv`, `batch_norm`, `ConvBN`, `BasicBlock` and `ResLayer` take kernels of any rank, so the
per-frame 2D ResNet of the global encoder (`resnet2d.py`) is built from the same blocks.

Two inference and accelerator options, both computing the same function from the same parameters:
`conv3d_implementation` runs the 3D convolutions as per-tap 2D convolutions ('frame_conv', the
default: faster on XLA:CPU) or as XLA's native 3D convolution ('native'); `fold_batch_norm` takes
variables whose BatchNorm is folded into the convolutions (`fold_batch_norm` below), for inference.
"""
from collections.abc import Callable, Iterator, Sequence
import contextlib
import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import ultrasound_common.batch_norm
from ultrasound_common import errors

# Temporal kernel size of the 3x3x3 convolutions in layer1..layer4.
LARGE_WINDOW = (3, 3, 3, 3)  # `video_rn18_base`, used by both released checkpoints.
SMALL_WINDOW = (3, 1, 1, 1)  # `video_rn18_small_temporal_context`.
CONV3D_IMPLEMENTATIONS = ('frame_conv', 'native')

# torchvision initialises video ResNet convs with kaiming_normal_(mode="fan_out", relu).
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# Input bytes per loop step of `frame_conv` (4 MiB frames of layer1 at 256x256: 4 frames).
CHUNK_BYTES = 16 * 2**20


@contextlib.contextmanager
def unchunked() -> Iterator[None]:
  """`frame_conv`s traced in this context run in one pass, without a loop.

  For XLA's FLOP count (`cost_analysis`), which counts a loop's body once; the result is the same.
  """
  global CHUNK_BYTES
  saved, CHUNK_BYTES = CHUNK_BYTES, sys.maxsize
  try:
    yield
  finally:
    CHUNK_BYTES = saved


class FrameConv(nn.Module):
  """Bias-free 3D conv of temporal stride 1 (`frame_conv`), with symmetric zero padding k // 2.

  The parameter is the same `kernel` (kT, kH, kW, I, O) that nn.Conv would hold. With `causal`,
  its taps after the centre are zeroed in the forward pass, as the original's `CausalConv3d`
  (which zeroes them in its weight before every call): output t sees frames t - kT // 2 .. t.
  `implementation` 'native' computes the same convolution with XLA's 3D convolution instead.
  """
  features: int
  kernel: Sequence[int]
  strides: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  implementation: str = 'frame_conv'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides[0] != 1:
      raise ValueError(f'FrameConv: temporal stride must be 1, got {self.strides}')
    kernel = self.param('kernel', _KAIMING_FAN_OUT, (*self.kernel, x.shape[-1], self.features),
                        self.param_dtype)
    if self.causal:
      kernel = jnp.asarray(kernel).at[self.kernel[0] // 2 + 1:].set(0)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.implementation == 'native':
      return jax.lax.conv_general_dilated(
          x, kernel, tuple(self.strides), [(k // 2, k // 2) for k in self.kernel],
          dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    return frame_conv(x, kernel, tuple(self.strides[1:]))


def frame_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """3D conv of (B, T, H, W, C) frames as a sum of 2D convs over the kernel's temporal taps.

  out[t] = sum_k conv2d(x[t + k - kT // 2], kernel[k]) with zero frames beyond the sweep ends:
  exactly torch's Conv3d with padding (kT // 2, kH // 2, kW // 2) and strides (1, *strides).
  XLA:CPU runs these per-frame 2D convs 2x faster than its native 3D convolution (measured on a
  3x3x3 64->64 conv of 16 x 64 x 64 frames: 0.11 s vs 0.23 s), and the 3D CNN is 98% of
  DualTrack's compute.

  Each tap needs its own shifted copy of the input and a partial sum of the output's size. So that
  these exist for a few frames only, inputs of more than `CHUNK_BYTES` run in chunks of frames in
  a loop that writes into the output: the working memory is the input and the output, as in
  torch's direct 3D conv, instead of about kT + 2 times the output (the 64-frame DualTrack sweep:
  1.40 GiB of XLA temporaries instead of 3.16 GiB, and no slower).
  """
  chunk = max(1, CHUNK_BYTES // (x.shape[0] * x[0, 0].size * x.dtype.itemsize))
  if kernel.shape[0] == 1 or x.shape[1] <= chunk:
    return _one_pass(x, kernel, strides)
  return _chunked(x, kernel, strides, chunk)


def _tap_sum(tap_frames: Callable[[int], jax.Array], kernel: jax.Array,
             strides: tuple[int, int]) -> jax.Array:
  """sum_k conv2d(tap_frames(k), kernel[k]), where tap_frames(k) is (B, T, H, W, C)."""
  kh, kw = kernel.shape[1:3]
  out = None
  for k in range(kernel.shape[0]):
    frames = tap_frames(k)
    y = jax.lax.conv_general_dilated(
        frames.reshape(-1, *frames.shape[2:]), kernel[k], strides,
        ((kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y.reshape(*frames.shape[:2], *y.shape[1:])
    out = y if out is None else out + y
  return out


def _one_pass(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  kt, t = kernel.shape[0], x.shape[1]
  x = jnp.pad(x, ((0, 0), (kt // 2, kt // 2)) + ((0, 0),) * 3)
  return _tap_sum(lambda k: x[:, k:k + t], kernel, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], chunk: int) -> jax.Array:
  """`_one_pass` computed `chunk` output frames at a time."""
  kt, (b, t) = kernel.shape[0], x.shape[:2]

  def chunk_of_output(i):
    # The last chunk ends at the last frame and recomputes a few of its predecessor's frames.
    start = jnp.minimum(i * chunk, t - chunk)

    def tap_frames(k):  # Gathered per tap, so that one tap's input copy is live at a time.
      index = start + k - kt // 2 + jnp.arange(chunk)
      inside = ((index >= 0) & (index < t))[None, :, None, None, None]
      return jnp.where(inside, jnp.take(x, jnp.clip(index, 0, t - 1), axis=1), 0)

    return _tap_sum(tap_frames, kernel, strides), start

  size = [(n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(x.shape[2:4], kernel.shape[1:3],
                                                               strides)]
  # Every frame of `out` is overwritten. Its zeros are computed from x, or XLA allocates every
  # loop's output buffer at the program's start (they depend on nothing else).
  out = jnp.broadcast_to(0 * x[:1, :1, :1, :1, :1], (b, t, *size, kernel.shape[-1]))
  return jax.lax.fori_loop(
      0, -(-t // chunk),
      lambda i, out: jax.lax.dynamic_update_slice_in_dim(out, *chunk_of_output(i), axis=1), out)


def _chunked_fwd(x, kernel, strides, chunk):
  # Differentiated, the one-pass form runs instead, with its own backward: training keeps its speed
  # and memory, where the loop's transpose (a scatter-add into the whole input per chunk) is slow.
  del chunk
  return jax.vjp(lambda x, kernel: _one_pass(x, kernel, strides), x, kernel)


def _chunked_bwd(strides, chunk, one_pass_vjp, cotangent):
  del strides, chunk
  return one_pass_vjp(cotangent)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def conv(features: int, kernel: Sequence[int], strides: Sequence[int], *, name: str,
         dtype: Any, param_dtype: Any, causal: bool = False,
         conv3d_implementation: str = 'frame_conv') -> nn.Module:
  """Bias-free conv (2D, or 3D as `FrameConv`) with torch's symmetric zero padding k // 2.

  Explicit pairs, not "SAME": "SAME" pads stride-2 convs on even sizes asymmetrically (0 before,
  1 after), which shifts the sampling grid by one pixel relative to the PyTorch model.
  """
  if len(kernel) == 3:
    if conv3d_implementation not in CONV3D_IMPLEMENTATIONS:
      raise errors.InputError(f'conv3d_implementation={conv3d_implementation!r} is not one of '
                              f'{", ".join(CONV3D_IMPLEMENTATIONS)}')
    return FrameConv(features, tuple(kernel), tuple(strides), dtype=dtype,
                     param_dtype=param_dtype, causal=causal, implementation=conv3d_implementation,
                     name=name)
  return nn.Conv(features, tuple(kernel), strides=tuple(strides),
                 padding=tuple((k // 2, k // 2) for k in kernel), use_bias=False,
                 kernel_init=_KAIMING_FAN_OUT, dtype=dtype, param_dtype=param_dtype, name=name)


def batch_norm(*, train: bool, name: str, dtype: Any, param_dtype: Any,
               folded: bool = False) -> ultrasound_common.batch_norm.BatchNorm:
  """torch's BatchNorm (momentum 0.1, eps 1e-5): its unbiased running-variance update included.

  `folded`: only the bias of `fold_batch_norm`'s variables (inference).
  """
  # Flax momentum weights the old statistic: 0.9 here is torch's momentum=0.1.
  return ultrasound_common.batch_norm.BatchNorm(use_running_average=not train, momentum=0.9,
                                            epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                                            folded=folded, name=name)


def fold_batch_norm(variables: Any) -> dict[str, Any]:
  """`variables` of a ResNet here (or a model built of them) for `fold_batch_norm=True`.

  Every BatchNorm follows a bias-free convolution ('1' after '0', '4' after '3'), whose kernel
  is scaled per output channel (`ultrasound_common.batch_norm.fold`); inference only.
  """
  return ultrasound_common.batch_norm.fold(variables, out_axis=-1, epsilon=1e-5)


class ConvBN(nn.Module):
  """torch `Sequential(Conv, BatchNorm)`: children '0' (conv) and '1' (batch norm)."""
  features: int
  kernel: Sequence[int]
  strides: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.features, self.kernel, self.strides, name='0', causal=self.causal,
             conv3d_implementation=self.conv3d_implementation, **kw)(x)
    return batch_norm(train=train, name='1', folded=self.fold_batch_norm, **kw)(x)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: relu(conv2(conv1(x)) + shortcut(x)).

  `kernel` is (kT, 3, 3) in the video network and (3, 3) in the per-frame 2D one. The first block
  of layers 2-4 halves H and W in `conv1` and in a 1x1(x1) `downsample` shortcut. `causal` makes
  conv1 and conv2 causal in time (`FrameConv`).
  """
  features: int
  kernel: Sequence[int]
  spatial_stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_bn = functools.partial(ConvBN, self.features, dtype=self.dtype,
                                param_dtype=self.param_dtype,
                                conv3d_implementation=self.conv3d_implementation,
                                fold_batch_norm=self.fold_batch_norm)
    ones = (1,) * len(self.kernel)
    strides = ones[:-2] + (self.spatial_stride, self.spatial_stride)
    y = nn.relu(conv_bn(self.kernel, strides, causal=self.causal, name='conv1')(x, train))
    y = conv_bn(self.kernel, ones, causal=self.causal, name='conv2')(y, train)
    if self.spatial_stride != 1 or x.shape[-1] != self.features:
      x = conv_bn(ones, strides, name='downsample')(x, train)
    return nn.relu(y + x)


class Stem(nn.Module):
  """R(2+1)D stem: (1, 7, 7) stride (1, 2, 2) conv, BN, ReLU, (3, 1, 1) conv, BN, ReLU.

  Children '0', '1', '3', '4' as in torch (indices 2 and 5 are the parameter-free ReLUs). With
  `causal`, the temporal conv sees frames t - 1 and t only (the original's `CausalR2Plus1dStem`).
  """
  width: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_kw = dict(conv3d_implementation=self.conv3d_implementation, **kw)
    bn_kw = dict(train=train, folded=self.fold_batch_norm, **kw)
    x = conv(self.width, (1, 7, 7), (1, 2, 2), name='0', **conv_kw)(x)
    x = nn.relu(batch_norm(name='1', **bn_kw)(x))
    x = conv(self.features, (3, 1, 1), (1, 1, 1), name='3', causal=self.causal, **conv_kw)(x)
    return nn.relu(batch_norm(name='4', **bn_kw)(x))


class ResLayer(nn.Module):
  """Two BasicBlocks, children '0' and '1'; the first one strides H and W by `spatial_stride`."""
  features: int
  kernel: Sequence[int]
  spatial_stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block = functools.partial(BasicBlock, self.features, self.kernel, dtype=self.dtype,
                              param_dtype=self.param_dtype, causal=self.causal,
                              conv3d_implementation=self.conv3d_implementation,
                              fold_batch_norm=self.fold_batch_norm)
    x = block(self.spatial_stride, name='0')(x, train)
    return block(1, name='1')(x, train)


class VideoResNet(nn.Module):
  """DualTrack's video ResNet-18 feature extractor (`VideoResnetFeaturesOnly`), channels-last.

  Default attributes give the released large-window network (33,148,983 parameters).

  Attributes:
    widths: channels of layer1..layer4 (the stem also outputs widths[0]).
    stem_width: channels of the stem's spatial (1, 7, 7) conv.
    temporal_kernels: temporal kernel size of the 3x3x3-type convs of each layer; odd.
    dtype: computation dtype (e.g. jnp.bfloat16); batch statistics are still computed in float32.
    param_dtype: parameter dtype.
    causal: every temporal conv sees the current and past frames only (the original's causal
      variants, `causal_video_rn18_2_frames` and `vidrn18_small_window_trck_reg_causal`);
      `temporal_radius` then bounds the past context, and there is no future context.
    conv3d_implementation: 'frame_conv' (default) or 'native' (module docstring).
    fold_batch_norm: inference with variables from `fold_batch_norm`.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 45
  temporal_kernels: Sequence[int] = LARGE_WINDOW
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  @property
  def temporal_radius(self) -> int:
    """Frames on each side that influence an output frame (stem 1, plus 4 convs per layer)."""
    return 1 + sum(4 * (k // 2) for k in self.temporal_kernels)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (B, T, H, W, C) frames to the layer4 feature map (B, T, H/16, W/16, widths[-1]).

    Args:
      x: input frames, channels-last.
      train: batch norm uses (and updates) batch statistics when True, running ones otherwise.
    """
    if x.ndim != 5:
      raise ValueError(f'VideoResNet: input must be (B, T, H, W, C), got shape {x.shape}')
    if len(self.temporal_kernels) != len(self.widths):
      raise ValueError(f'VideoResNet: temporal_kernels {tuple(self.temporal_kernels)} needs one '
                       f'entry per layer of widths {tuple(self.widths)}')
    if any(k < 1 or k % 2 == 0 for k in self.temporal_kernels):
      raise ValueError('VideoResNet: temporal_kernels must be odd (symmetric padding keeps T), '
                       f'got {tuple(self.temporal_kernels)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, causal=self.causal,
              conv3d_implementation=self.conv3d_implementation,
              fold_batch_norm=self.fold_batch_norm)
    x = Stem(self.stem_width, self.widths[0], name='stem', **kw)(x, train)
    for i, (width, kt) in enumerate(zip(self.widths, self.temporal_kernels)):
      x = ResLayer(width, (kt, 3, 3), 1 if i == 0 else 2, name=f'layer{i + 1}', **kw)(x, train)
    return x
