"""I-JEPA for SONICHU's backbone: masked context encoder, narrow predictor and the loss.

Reproduces `src/models/vision_transformer.py` and `src/train.py` of facebookresearch/ijepa (commit
52c1ae9) with fixed token counts: index lists come padded with validity masks
(`sonichu_jax.data.ijepa_masks`), padded keys are masked out of every attention and padded targets
out of the loss, so the padded model computes exactly what the original computes on the unpadded
lists.

- `MaskedEncoder` is SONICHU's `VisionTransformer` (same parameter tree, so its params ARE the
  backbone's) that keeps only the context tokens after adding the position table, as the original
  encoder's `apply_masks` does; with every index and no padding it equals `VisionTransformer`.
- `Predictor` is `VisionTransformerPredictor`: `predictor_embed` to the narrow width, the fixed
  sin-cos table added to the context tokens, one learned `mask_token` plus its position per
  target patch, pre-LN blocks, `predictor_norm`, `predictor_proj` back to the encoder width. The
  original runs the M target blocks as M separate sequences (the context tiled M times); so does
  this one, as (B * M) sequences.
- `ijepa_loss`: the target encoder sees the whole image; its output goes through a LayerNorm
  without parameters (`F.layer_norm`, eps 1e-5), the target patches are gathered from it, and the
  loss is `F.smooth_l1_loss` (beta 1) averaged over every element of the valid target tokens.

Initialisation: the original's `init_model` re-initialises every Linear with trunc_normal(0.02)
after construction, which undoes the predictor's `fix_init_weight` rescaling; so the predictor's
blocks start at plain N(0, 0.02) here (the encoder keeps vit.py's init: SONICHU's backbone).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sonichu_jax.models import vit

_INIT = nn.initializers.normal(0.02)
# F.layer_norm's default epsilon (the targets' LayerNorm; the networks' own norms use 1e-6).
TARGET_LN_EPS = 1e-5


class MaskedAttention(nn.Module):
  """vit.Attention (same `qkv` and `proj`) with a key-padding mask."""
  num_heads: int
  out_init: nn.initializers.Initializer
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, key_valid: jax.Array | None) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = nn.Dense(3 * d, kernel_init=_INIT, name='qkv', **kw)(x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    logits = (jnp.einsum('bhqc,bhkc->bhqk', q, k) * head_dim ** -0.5).astype(jnp.float32)
    if key_valid is not None:
      logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkc->bqhc', weights, v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=self.out_init, name='proj', **kw)(out)


class MaskedBlock(nn.Module):
  """vit.Block (same names: norm1, attn, norm2, mlp) with a key-padding mask; no drop path."""
  num_heads: int
  mlp_dim: int
  out_init: nn.initializers.Initializer
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, key_valid: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + MaskedAttention(self.num_heads, self.out_init, name='attn', **kw)(
        vit._layer_norm('norm1', **kw)(x), key_valid)  # pylint: disable=protected-access
    return x + vit.Mlp(self.mlp_dim, self.out_init, name='mlp', **kw)(
        vit._layer_norm('norm2', **kw)(x))  # pylint: disable=protected-access


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (B, N, D) at index (B, ...) -> (B, ..., D): the original's `apply_masks` per image."""
  flat = index.reshape(index.shape[0], -1)
  out = jnp.take_along_axis(x, flat[..., None], axis=1)
  return out.reshape(*index.shape, x.shape[-1])


class MaskedEncoder(nn.Module):
  """SONICHU's ViT (vit.VisionTransformer's parameters and init) on a subset of tokens.

  Attributes: those of vit.VisionTransformer (no drop path: I-JEPA's encoders use none).
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, index: jax.Array | None = None,
               valid: jax.Array | None = None) -> jax.Array:
    """(B, H, W, 3) images -> (B, K, D) tokens at `index` (B, K), or all (B, N, D) if None."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = vit.PatchEmbed(self.embed_dim, self.patch_size, 0, name='patch_embed', **kw)(images)
    b, gh, gw, d = x.shape
    pos_embed = self.param('pos_embed', lambda _, grid: jnp.asarray(vit.sincos_pos_embed(grid, d)),
                           (gh, gw))
    x = x.reshape(b, gh * gw, d) + pos_embed.astype(x.dtype)
    if index is not None:
      x = gather_tokens(x, index)
    for i in range(self.depth):
      # vit.Block's init: the residual outputs of block l start divided by sqrt(2 l).
      out_init = nn.initializers.normal(0.02 / np.sqrt(2.0 * (i + 1)))
      x = MaskedBlock(self.num_heads, int(self.embed_dim * self.mlp_ratio), out_init,
                      name=f'blocks_{i}', **kw)(x, valid)
    return vit._layer_norm('norm', **kw)(x)  # pylint: disable=protected-access


class Predictor(nn.Module):
  """I-JEPA's VisionTransformerPredictor (module docstring); the position table is a constant.

  Attributes:
    grid: the patch grid (rows, cols) of the sin-cos table.
    embed_dim: the encoder width (input and output).
    predictor_dim: the narrow width (384 for ViT-B).
    depth: blocks (6 for ViT-B).
    num_heads: heads (the encoder's: 12).
    mlp_ratio: MLP hidden width / predictor_dim.
    dtype, param_dtype: computation and parameter dtypes.
  """
  grid: tuple[int, int] = (16, 16)
  embed_dim: int = 768
  predictor_dim: int = 384
  depth: int = 6
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, context: jax.Array, context_index: jax.Array, context_valid: jax.Array,
               target_index: jax.Array, target_valid: jax.Array) -> jax.Array:
    """Predicts the target tokens.

    Args:
      context: (B, Kc, D) context encoder output.
      context_index, context_valid: (B, Kc) their patch indices and validity.
      target_index, target_valid: (B, M, Kt) the target blocks' patch indices and validity.

    Returns:
      (B, M, Kt, D) predictions (garbage at padded target positions).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, m, kt = target_index.shape
    kc = context.shape[1]
    # The original stores this table as a frozen parameter; it never changes, so it is a constant.
    pos = jnp.asarray(vit.sincos_pos_embed(self.grid, self.predictor_dim))[0].astype(self.dtype)
    x = nn.Dense(self.predictor_dim, kernel_init=_INIT, name='predictor_embed', **kw)(context)
    x = x + pos[context_index]
    mask_token = self.param('mask_token', _INIT, (1, 1, self.predictor_dim), self.param_dtype)
    queries = mask_token.astype(self.dtype) + pos[target_index]  # (B, M, Kt, d)
    # One sequence per (image, target block): the context repeated, then that block's queries.
    x = jnp.broadcast_to(x[:, None], (b, m, kc, self.predictor_dim))
    x = jnp.concatenate([x, queries], axis=2).reshape(b * m, kc + kt, self.predictor_dim)
    valid = jnp.concatenate([jnp.broadcast_to(context_valid[:, None], (b, m, kc)), target_valid],
                            axis=2).reshape(b * m, kc + kt)
    for i in range(self.depth):
      x = MaskedBlock(self.num_heads, int(self.predictor_dim * self.mlp_ratio), _INIT,
                      name=f'blocks_{i}', **kw)(x, valid)
    x = vit._layer_norm('predictor_norm', **kw)(x)  # pylint: disable=protected-access
    x = nn.Dense(self.embed_dim, kernel_init=_INIT, name='predictor_proj', **kw)(x[:, kc:])
    return x.reshape(b, m, kt, self.embed_dim)


class IJepa(nn.Module):
  """The context encoder (`encoder`) and the predictor (`predictor`) of one I-JEPA model.

  The target encoder is the same `MaskedEncoder` applied to the EMA parameters (`encode`).
  """
  encoder: MaskedEncoder
  predictor: Predictor

  def __call__(self, images, context_index, context_valid, target_index, target_valid):
    """(B, M, Kt, D) predictions of the target tokens from the context tokens."""
    context = self.encoder(images, context_index, context_valid)
    return self.predictor(context, context_index, context_valid, target_index, target_valid)

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, N, D): the encoder on every token (the target encoder's forward)."""
    return self.encoder(images)


def smooth_l1(x: jax.Array) -> jax.Array:
  """torch's smooth_l1 with beta 1, elementwise: 0.5 x^2 if |x| < 1, else |x| - 0.5."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def target_features(model: IJepa, target_params, images: jax.Array) -> jax.Array:
  """(B, N, D) float32: the target encoder's output after a LayerNorm without parameters."""
  h = model.apply({'params': {'encoder': target_params}}, images, method=IJepa.encode)
  h = h.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(var + TARGET_LN_EPS)


def ijepa_loss(model: IJepa, params, target_params, images: jax.Array, context_index: jax.Array,
               context_valid: jax.Array, target_index: jax.Array, target_valid: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The I-JEPA loss of one batch, on masks given from outside.

  Args:
    model: the IJepa module.
    params: {'encoder': ..., 'predictor': ...} (differentiated).
    target_params: the target encoder's parameters (treated as constants).
    images: (B, H, W, 3) normalised images.
    context_index, context_valid: (B, Kc) int and bool (`sonichu_jax.data.ijepa_masks`).
    target_index, target_valid: (B, M, Kt) int and bool.

  Returns:
    (loss, aux): the smooth-L1 mean over valid target elements; aux has 'target_std' (the mean over
    feature dimensions of the per-dimension std of the normalised targets over every token of the
    batch: near 0 means collapse) and 'zero_prediction_loss' (the loss of predicting 0, a
    baseline the predictor must beat).
  """
  h = jax.lax.stop_gradient(target_features(model, target_params, images))
  targets = gather_tokens(h, target_index)  # (B, M, Kt, D)
  z = model.apply({'params': params}, images, context_index, context_valid, target_index,
                  target_valid).astype(jnp.float32)
  weight = target_valid.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(weight), 1.0) * h.shape[-1]
  loss = jnp.sum(smooth_l1(z - targets) * weight) / count
  zero = jnp.sum(smooth_l1(targets) * weight) / count
  target_std = jnp.mean(jnp.std(h.reshape(-1, h.shape[-1]), axis=0))
  return loss, {'target_std': target_std, 'zero_prediction_loss': zero}
