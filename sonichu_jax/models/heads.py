"""ViTPose "classic" keypoint head and the soft-argmax decoder (docs/sonichu.md, sections
"Architecture" and "Soft-argmax").

Head: ConvTranspose 4x4 stride 2 (no bias), BatchNorm, ReLU, twice, then a 1x1 conv to K heatmap
logits; (B, 16, 16, 768) tokens become (B, 64, 64, K). Children are named as mmpose's
`TopdownHeatmapSimpleHead` (`deconv_layers.{0,1,3,4}`, `final_layer`; indices 2 and 5 are the
parameter-free ReLUs), with Flax's `_` for torch's `.` after `deconv_layers`.

torch's ConvTranspose2d(k=4, s=2, p=1, output_padding=0) is Flax's ConvTranspose with
`transpose_kernel=True` and explicit padding k - 1 - p = 2 on each side; its (I, O, kh, kw) weight
becomes the (kh, kw, O, I) kernel by the permutation (2, 3, 1, 0).

`deconv_implementation='subpixel'` (the default) computes the deconvolutions from their kernels
as one stride-1 convolution and a depth-to-space (`subpixel_conv_transpose`): XLA's GPU transposed
convolutions are a known slow path (jax issues 23783, 31662), and on XLA:CPU the head runs about
1.35x faster this way (docs/performance.md); 'transposed' is Flax's ConvTranspose.
`fold_batch_norm` takes variables whose BatchNorm is folded into the deconvolutions
(`ultrasound_common.batch_norm.fold`), for inference.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ultrasound_common import batch_norm
from ultrasound_common import errors

DECONV_IMPLEMENTATIONS = ('subpixel', 'transposed')
# Output phase p (0: even, 1: odd) and tap t of its 2x2 window -> row (or column) of the 4x4
# kernel: output 2m + p of torch's ConvTranspose2d(k=4, s=2, p=1) reads input m - 1 + p + t (tap
# t of the window starting at m + p in the input padded by 1) through kernel index 3 - p - 2t.
_PHASE_TAPS = np.array([[3, 1], [2, 0]])


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """torch's ConvTranspose2d(k=4, s=2, p=1) as a stride-1 convolution and a depth-to-space.

  Args:
    x: (B, h, w, I) inputs.
    kernel: the (4, 4, O, I) kernel of Flax's `ConvTranspose(transpose_kernel=True)`.

  Returns:
    (B, 2h, 2w, O), equal to the transposed convolution: each of the four output phases
    (row and column parity) is a 2x2 convolution of the input padded by 1, so one 2x2 VALID
    convolution to 4 O channels computes all of them at (h + 1) x (w + 1) positions, and output
    (2m + py, 2n + px) is phase (py, px) at (m + py, n + px).
  """
  if kernel.shape[:2] != (4, 4):
    raise ValueError(f'subpixel_conv_transpose: needs a 4x4 kernel, got {kernel.shape}')
  b, h, w, _ = x.shape
  out = kernel.shape[2]
  # (py, ty, px, tx, O, I) -> (ty, tx, I, py, px, O) -> HWIO with 4 O outputs.
  phases = kernel[_PHASE_TAPS][:, :, _PHASE_TAPS].transpose(1, 3, 5, 0, 2, 4)
  phases = phases.reshape(2, 2, kernel.shape[3], 4 * out)
  # The 2x2 convolution as four shifted matmuls: its gradients are matmuls too, where XLA:CPU's
  # convolution kernel gradients are a slow path (6 of the 8.5 s of a full-size SONICHU gradient
  # at batch 2 went to the heads' deconvolution kernels).
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(jnp.einsum('bhwi,io->bhwo', padded[:, ty:ty + h + 1, tx:tx + w + 1], phases[ty, tx])
          for ty in (0, 1) for tx in (0, 1)).reshape(b, h + 1, w + 1, 2, 2, out)
  rows = [jnp.stack([y[:, py:py + h, px:px + w, py, px] for px in (0, 1)], axis=3)
          for py in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, out)


class SubPixelConvTranspose(nn.Module):
  """`nn.ConvTranspose(features, (4, 4), (2, 2), ((2, 2), (2, 2)), transpose_kernel=True,
  use_bias=False)`, the same `kernel` parameter, computed by `subpixel_conv_transpose`."""
  features: int
  kernel_init: nn.initializers.Initializer
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (4, 4, self.features, x.shape[-1]),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return subpixel_conv_transpose(x, kernel)


class ViTPoseHead(nn.Module):
  """ViTPose classic decoder: two 2x deconvolutions of `filters` channels, a 1x1 conv to K logits.

  Attributes:
    num_keypoints: K, output channels.
    filters: channels of both deconvolutions (256 in ViTPose and SONICHU).
    dtype: computation dtype; batch statistics stay float32.
    param_dtype: parameter dtype.
    deconv_implementation: 'subpixel' (the kernels as a stride-1 convolution and a
      depth-to-space) or 'transposed' (Flax's ConvTranspose); the same function.
    fold_batch_norm: the variables have BatchNorm folded into the deconvolutions (inference).
  """
  num_keypoints: int
  filters: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deconv_implementation: str = 'subpixel'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps the (B, h, w, C) token map to (B, 4h, 4w, K) heatmap logits.

    Args:
      x: backbone output, channels-last.
      train: batch norm uses (and, with mutable 'batch_stats', updates) the batch's statistics.
    """
    if self.deconv_implementation not in DECONV_IMPLEMENTATIONS:
      raise errors.InputError(f'ViTPoseHead: deconv_implementation={self.deconv_implementation!r} '
                              f'is not one of {", ".join(DECONV_IMPLEMENTATIONS)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # ViTPose's init_weights: deconvolutions and the final conv ~ N(0, 0.001), zero final bias, so
    # the initial heatmaps are nearly flat and soft-argmax starts at the image centre.
    small = nn.initializers.normal(0.001)
    for i in (0, 3):
      name = f'deconv_layers_{i}'
      if self.deconv_implementation == 'subpixel':
        x = SubPixelConvTranspose(self.filters, small, name=name, **kw)(x)
      else:
        x = nn.ConvTranspose(self.filters, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                             transpose_kernel=True, use_bias=False, kernel_init=small, name=name,
                             **kw)(x)
      # torch's BatchNorm2d, unbiased running variance included; Flax momentum weights the old
      # statistic: 0.9 is torch's momentum=0.1.
      x = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               folded=self.fold_batch_norm, name=f'deconv_layers_{i + 1}',
                               **kw)(x)
      x = nn.relu(x)
    return nn.Conv(self.num_keypoints, (1, 1), kernel_init=small, name='final_layer', **kw)(x)


def soft_argmax(heatmaps: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Expected pixel-centre position under softmax(heatmaps / temperature), normalised to (0, 1).

  x = sum_ij p(i, j) (j + 0.5) / W and y = sum_ij p(i, j) (i + 0.5) / H: with pixel centres a
  mirrored heatmap gives exactly 1 - x, which flip TTA relies on; as the temperature goes
  to 0 a delta at (i, j) gives ((j + 0.5) / W, (i + 0.5) / H).

  Args:
    heatmaps: (..., H, W, K) logits.
    temperature: softmax temperature (> 0).

  Returns:
    (..., K, 2) float32 coordinates (x, y).
  """
  *lead, h, w, k = heatmaps.shape
  logits = heatmaps.astype(jnp.float32).reshape(*lead, h * w, k) / temperature
  p = jax.nn.softmax(logits, axis=-2).reshape(*lead, h, w, k)
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
  # Full float32 sums: the default TPU/GPU matmul precision would round p to bfloat16/TF32.
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('...hwk,w->...k', p, xs, precision=hi)
  y = jnp.einsum('...hwk,h->...k', p, ys, precision=hi)
  return jnp.stack([x, y], axis=-1)
