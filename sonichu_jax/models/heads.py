"""ViTPose "classic" keypoint head and the soft-argmax decoder (docs/sonichu.md, sections
"Architecture" and "Soft-argmax").

Head: ConvTranspose 4x4 stride 2 (no bias), BatchNorm, ReLU, twice, then a 1x1 conv to K heatmap
logits; (B, 16, 16, 768) tokens become (B, 64, 64, K). Children are named as mmpose's
`TopdownHeatmapSimpleHead` (`deconv_layers.{0,1,3,4}`, `final_layer`; indices 2 and 5 are the
parameter-free ReLUs), with Flax's `_` for torch's `.` after `deconv_layers`.

torch's ConvTranspose2d(k=4, s=2, p=1, output_padding=0) is Flax's ConvTranspose with
`transpose_kernel=True` and explicit padding k - 1 - p = 2 on each side; its (I, O, kh, kw) weight
becomes the (kh, kw, O, I) kernel by the permutation (2, 3, 1, 0).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ultrasound_common import batch_norm


class ViTPoseHead(nn.Module):
  """ViTPose classic decoder: two 2x deconvolutions of `filters` channels, a 1x1 conv to K logits.

  Attributes:
    num_keypoints: K, output channels.
    filters: channels of both deconvolutions (256 in ViTPose and SONICHU).
    dtype: computation dtype; batch statistics stay float32.
    param_dtype: parameter dtype.
  """
  num_keypoints: int
  filters: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps the (B, h, w, C) token map to (B, 4h, 4w, K) heatmap logits.

    Args:
      x: backbone output, channels-last.
      train: batch norm uses (and, with mutable 'batch_stats', updates) the batch's statistics.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # ViTPose's init_weights: deconvolutions and the final conv ~ N(0, 0.001), zero final bias, so
    # the initial heatmaps are nearly flat and soft-argmax starts at the image centre.
    small = nn.initializers.normal(0.001)
    for i in (0, 3):
      x = nn.ConvTranspose(self.filters, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                           transpose_kernel=True, use_bias=False, kernel_init=small,
                           name=f'deconv_layers_{i}', **kw)(x)
      # torch's BatchNorm2d, unbiased running variance included; Flax momentum weights the old
      # statistic: 0.9 is torch's momentum=0.1.
      x = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               name=f'deconv_layers_{i + 1}', **kw)(x)
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
