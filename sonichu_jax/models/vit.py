"""ViT-B/16 backbone of SONICHU: I-JEPA's encoder, channels-last, timm parameter names.

The network: a 16x16 stride-16 patch convolution, a stored position embedding with one entry per
patch (I-JEPA has no class token; its table is a fixed 2-D sin-cos one), pre-LN transformer blocks
(LayerNorm eps 1e-6, fused qkv with bias, exact erf GELU as torch's nn.GELU) and a final LayerNorm.
The output is the token map (B, H/16, W/16, D), the input of the ViTPose heads.

Module names are timm's and I-JEPA's (`patch_embed/proj`, `pos_embed`, `blocks_{i}/{norm1,
attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}`, `norm`), so a checkpoint converts by a renaming table
(sonichu_jax/convert.py).

`patch_padding` exists for ViTPose checkpoints only: mmpose's ViT
(`mmpose/models/backbones/vit.py` in ViTPose) pads its patch convolution by 2 pixels, which keeps
the grid size but shifts it; 0 (timm, I-JEPA, SONICHU) is the default.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ultrasound_common import activations
from ultrasound_common import attention

# I-JEPA / timm initialisation: Linear and Conv weights ~ N(0, 0.02) (torch's trunc_normal_(std=.02)
# truncates at +-2 absolute, i.e. at 100 sigma: a plain normal), zero biases.
_WEIGHT_INIT = nn.initializers.normal(0.02)


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> np.ndarray:
  """I-JEPA's fixed 2-D sin-cos position table, (1, gh * gw, dim), rows in row-major patch order.

  Channels [0, dim/2) encode the column (x) index and [dim/2, dim) the row (y) index (I-JEPA's
  meshgrid puts w first); each half is [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim / 4)).
  """
  if dim % 4:
    raise ValueError(f'sincos_pos_embed: dim must be a multiple of 4, got {dim}')
  gh, gw = grid
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing='ij')

  def encode(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([encode(cols), encode(rows)], axis=1)[None].astype(np.float32)


class PatchEmbed(nn.Module):
  """timm `PatchEmbed`: child `proj`, a patch_size x patch_size conv with stride patch_size."""
  embed_dim: int
  patch_size: int
  padding: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, pad = self.patch_size, self.padding
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding=((pad, pad), (pad, pad)),
                   kernel_init=_WEIGHT_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='proj')(x)


class Attention(nn.Module):
  """Multi-head self-attention: timm's fused `qkv` (outputs (3, heads, head_dim)) and `proj`.

  `attention_implementation` is 'einsum' (the explicit form below), 'xla' or 'cudnn'
  (`jax.nn.dot_product_attention`; see ultrasound_common/attention.py).
  """
  num_heads: int
  out_init: nn.initializers.Initializer
  dtype: Any
  param_dtype: Any
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, kernel_init=_WEIGHT_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    fused = attention.fused(self.attention_implementation, qkv[:, :, 0], dropout_active=False,
                            owner='VisionTransformer')
    if fused:
      out = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], fused)
      out = out.reshape(b, n, d)
    else:
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      logits = jnp.einsum('bhqc,bhkc->bhqk', q, k) * head_dim ** -0.5
      # Softmax in float32 even for bfloat16 activations.
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum('bhqk,bhkc->bqhc', weights, v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=self.out_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='proj')(out)


class Mlp(nn.Module):
  """timm `Mlp`: `fc1`, exact GELU, `fc2`."""
  hidden_dim: int
  out_init: nn.initializers.Initializer
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.hidden_dim, kernel_init=_WEIGHT_INIT, name='fc1', **kw)(x)
    h = activations.gelu(h)  # torch's nn.GELU: exact, not flax's default tanh approximation.
    return nn.Dense(x.shape[-1], kernel_init=self.out_init, name='fc2', **kw)(h)


def _layer_norm(name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  # eps 1e-6 as timm/I-JEPA (torch's default is 1e-5); two-pass variance, as torch computes it.
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


def _drop_path(x: jax.Array, rate: float, deterministic: bool, module: nn.Module) -> jax.Array:
  """Stochastic depth: drops a residual branch per sample; scales kept ones by 1 / (1 - rate)."""
  if deterministic or rate == 0.0:
    return x
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_dim: int
  depth_index: int  # 1-based, for I-JEPA's init rescaling of the residual outputs.
  drop_path: float
  dtype: Any
  param_dtype: Any
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # I-JEPA's fix_init_weight: attn.proj and mlp.fc2 of block l start divided by sqrt(2 l).
    out_init = nn.initializers.normal(0.02 / np.sqrt(2.0 * self.depth_index))
    y = Attention(self.num_heads, out_init, name='attn',
                  attention_implementation=self.attention_implementation, **kw)(
                      _layer_norm('norm1', **kw)(x))
    x = x + _drop_path(y, self.drop_path, deterministic, self)
    y = Mlp(self.mlp_dim, out_init, name='mlp', **kw)(_layer_norm('norm2', **kw)(x))
    return x + _drop_path(y, self.drop_path, deterministic, self)


class VisionTransformer(nn.Module):
  """ViT encoder without class token; the defaults are SONICHU's ViT-B/16 (85,843,200 parameters).

  Attributes:
    patch_size: side of the square patches.
    embed_dim: token width D.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    patch_padding: zero padding of the patch conv (2 for ViTPose checkpoints, else 0).
    drop_path_rate: stochastic depth of the last block, linearly from 0 at the first (timm's rule).
    dtype: computation dtype; parameters stay in `param_dtype`.
    param_dtype: parameter dtype.
    attention_implementation: 'einsum' (default), 'xla' or 'cudnn' (see `Attention`).
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_padding: int = 0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (B, H, W, 3) normalised images to the token map (B, H/p, W/p, D).

    Args:
      images: channels-last input; H and W give the token grid and so the position table's size.
      train: enables stochastic depth (needs a 'dropout' rng when drop_path_rate > 0).
    """
    if images.ndim != 4:
      raise ValueError(f'VisionTransformer: images must be (B, H, W, C), got shape {images.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(self.embed_dim, self.patch_size, self.patch_padding, name='patch_embed', **kw)(
        images)
    b, gh, gw, d = x.shape
    # Stored as a parameter, as in the checkpoints; I-JEPA keeps it frozen (requires_grad=False), so
    # a trainer reproducing it should not update this leaf.
    if self.has_variable('params', 'pos_embed'):
      shape = self.get_variable('params', 'pos_embed').shape
      if shape != (1, gh * gw, d):
        raise ValueError(f'VisionTransformer: pos_embed has shape {shape}, but a '
                         f'{images.shape[1]}x{images.shape[2]} input needs (1, {gh * gw}, {d})')
    pos_embed = self.param('pos_embed', lambda _, grid: jnp.asarray(sincos_pos_embed(grid, d)),
                           (gh, gw))
    x = x.reshape(b, gh * gw, d) + pos_embed.astype(x.dtype)
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = Block(self.num_heads, int(self.embed_dim * self.mlp_ratio), i + 1, rate,
                attention_implementation=self.attention_implementation, name=f'blocks_{i}',
                **kw)(x, not train)
    x = _layer_norm('norm', **kw)(x)
    return x.reshape(b, gh, gw, d)
