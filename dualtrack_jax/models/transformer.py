"""The attention blocks of DualTrack: HF BERT layers (relative-key, cross-attention) and HF ViT.

`BertLayer` / `BertEncoder` reproduce HF `transformers` `BertLayer` / `BertEncoder` as DualTrack
builds them for its temporal BERT, global BERT and fusion module (eager attention, no masks;
docs/dualtrack.md, section "Architecture"): post-LN, LayerNorm eps 1e-12, exact erf GELU,
dropout on attention probabilities and on each sub-layer output. With `max_positions` P set,
self-attention adds HF's "relative_key" term: logits
(q_l.k_r + q_l.E[l - r + P - 1]) / sqrt(d), the term added before the scaling, with one table E
(`distance_embedding`, (2P - 1, head_dim)) per layer shared by all heads and l, r token indices.
Cross-attention never has a positional term (HF builds it with position_embedding_type
"absolute"). `ViTEncoder` is HF `ViTModel(add_pooling_layer=False)` returning the CLS token
(the local encoder's stage 2): pre-LN layers without dropout.

`attention_implementation` (every module here) selects how attention runs: 'einsum' (the default,
the explicit form of `_attention`), 'xla' or 'cudnn' (`jax.nn.dot_product_attention`, the
relative-key term as its additive bias; see ultrasound_common/attention.py).

torch -> Flax names (Linear weight (out, in) -> Dense kernel (in, out), LayerNorm weight -> scale):
  layer.{i}.attention.self.{query,key,value}    -> layer_{i}/attention/{query,key,value}
  layer.{i}.attention.self.distance_embedding   -> layer_{i}/attention/distance_embedding
  layer.{i}.attention.output.{dense,LayerNorm}  -> layer_{i}/attention/output/{dense,LayerNorm}
  layer.{i}.crossattention.self.*, .output.*    -> layer_{i}/crossattention/*, .../output/*
  layer.{i}.{intermediate,output}.*             -> layer_{i}/{intermediate,output}/*
  vit.embeddings.{cls_token,position_embeddings} -> vit/embeddings/{same}
  vit.embeddings.patch_embeddings.projection (O, I, kH, kW)
                                                -> vit/embeddings/patch_embeddings (kH, kW, I, O)
  vit.encoder.layer.{i}.attention.attention.{query,key,value}
                                                -> vit/layer_{i}/attention/{query,key,value}
  vit.encoder.layer.{i}.attention.output.dense  -> vit/layer_{i}/attention/output
  vit.encoder.layer.{i}.{intermediate,output}.dense -> vit/layer_{i}/{intermediate,output}
  vit.encoder.layer.{i}.layernorm_{before,after}, vit.layernorm -> same names

Initialisation follows what the original trains from: HF's `BertEncoder` is a plain `nn.Module`
(no `_init_weights`), so BERT layers get PyTorch defaults (Linear U(+-1/sqrt(fan_in)), Embedding
N(0, 1)); `ViTModel` runs HF's `_init_weights` (weights N(0, 0.02), zero biases).
"""
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ultrasound_common import activations
from ultrasound_common import attention

LAYER_NORM_EPS = 1e-12  # HF BertConfig / ViTConfig default (Flax's default is 1e-6).
# HF ViT: torch trunc_normal_(std=0.02, a=-2, b=2), whose absolute bounds are 100 std away.
_VIT_INIT = nn.initializers.normal(0.02)


def torch_linear(features: int, fan_in: int, *, use_bias: bool = True, name: str,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Dense:
  """Dense layer initialised like torch.nn.Linear: weight and bias U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  return nn.Dense(
      features, use_bias=use_bias,
      # kaiming_uniform_(a=sqrt(5)) is a variance scaling of 1/3 over fan_in.
      kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
      bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
      dtype=dtype, param_dtype=param_dtype, name=name)


def relative_key_logits(q: jax.Array, table: jax.Array) -> jax.Array:
  """HF "relative_key" scores q_l . E[l - r + P - 1] for all token pairs, in float32.

  Computes q against only the 2N - 1 distances that occur, E[P - N : P + N - 1], as one matmul of
  shape (N, 2N - 1) per head, then "skews" row l so that column r holds distance l - r. Memory is
  O(N^2) per head, never the (N, N, head_dim) gathered embeddings of the torch code.

  Args:
    q: queries (B, N, H, d).
    table: the distance embedding (2P - 1, d), P >= N.

  Returns:
    (B, H, N, N) scores, [b, h, l, r] = q[b, l, h] . table[l - r + P - 1].
  """
  n = q.shape[1]
  num_positions = (table.shape[0] + 1) // 2
  # Distances n - 1 down to 1 - n: column j of `scores` is distance l - r = n - 1 - j.
  window = lax.slice_in_dim(table, num_positions - n, num_positions + n - 1)[::-1]
  scores = jnp.einsum('blhd,jd->bhlj', q, window.astype(q.dtype),
                      preferred_element_type=jnp.float32)  # (B, H, N, 2N - 1)
  if n == 1:
    return scores
  # Want out[l, r] = scores[l, r + n - 1 - l]: in the row-major flattening that is element
  # l * (2n - 2) + r + (n - 1), so drop n - 1 entries and re-read rows of stride 2n - 2.
  flat = scores.reshape(*scores.shape[:-2], n * (2 * n - 1))[..., n - 1:n - 1 + n * (2 * n - 2)]
  return flat.reshape(*scores.shape[:-2], n, 2 * n - 2)[..., :n]


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, relative: jax.Array | None,
               dropout: nn.Dropout | None, deterministic: bool, implementation: str,
               owner: str) -> jax.Array:
  """softmax((q.k [+ relative]) / sqrt(d)) v over (B, N, H, d) heads; logits and softmax in f32.

  `implementation` (ultrasound_common/attention.py) 'xla' or 'cudnn' runs it as
  `jax.nn.dot_product_attention` with the bias relative / sqrt(d), unless attention dropout
  applies; 'einsum' is the explicit form below.
  """
  dropout_active = dropout is not None and dropout.rate > 0 and not deterministic
  fused = attention.fused(implementation, q, dropout_active=dropout_active, owner=owner)
  if fused:
    scale = 1 / math.sqrt(q.shape[-1])
    return attention.dot_product_attention(
        q, k, v, fused, bias=None if relative is None else relative * scale, scale=scale)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if relative is not None:
    logits = logits + relative  # before the scaling, as HF does
  probs = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def _split_heads(x: jax.Array, num_heads: int, module: str) -> jax.Array:
  if x.shape[-1] % num_heads:
    raise ValueError(f'{module}: hidden size {x.shape[-1]} is not a multiple of the '
                     f'{num_heads} heads')
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _module_name(module: nn.Module) -> str:
  path = module.scope.path if module.scope is not None else ()
  return '/'.join(path) or type(module).__name__


class BertOutput(nn.Module):
  """HF BertSelfOutput / BertOutput: LayerNorm(residual + Dropout(dense(x)))."""
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
    x = torch_linear(residual.shape[-1], x.shape[-1], name='dense', dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='LayerNorm')(x + residual)


class BertAttention(nn.Module):
  """HF BertAttention (self or cross), including its output block.

  Attributes:
    num_heads: attention heads; the head size is hidden // num_heads.
    max_positions: P of the relative-key term (self-attention only); None for no positional term.
    dropout: on the attention probabilities and on the output (HF default 0.1).
    dtype: computation dtype of the matmuls; logits and softmax are float32.
    param_dtype: parameter dtype.
    attention_implementation: 'einsum', 'xla' or 'cudnn' (module docstring).
  """
  num_heads: int
  max_positions: int | None = None
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """Attends from x (B, N, D) to itself, or to `context` (B, M, D) for cross-attention."""
    name = _module_name(self)
    n, hidden = x.shape[-2:]
    if self.max_positions is not None:
      if context is not None:
        raise ValueError(f'{name}: the relative-key term exists only in self-attention')
      # torch raises IndexError here; shapes are static, so refuse at trace time.
      if n > self.max_positions:
        raise ValueError(f'{name}: {n} frames > {self.max_positions} positions of the '
                         'relative position table (max_positions); the sweep is too long')
    source = x if context is None else context

    def heads(label: str, inputs: jax.Array) -> jax.Array:
      dense = torch_linear(hidden, inputs.shape[-1], name=label, dtype=self.dtype,
                           param_dtype=self.param_dtype)
      return _split_heads(dense(inputs), self.num_heads, name)

    q, k, v = heads('query', x), heads('key', source), heads('value', source)
    relative = None
    if self.max_positions is not None:
      table = nn.Embed(2 * self.max_positions - 1, q.shape[-1],
                       embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding
                       param_dtype=self.param_dtype, name='distance_embedding').embedding
      relative = relative_key_logits(q, table)
    context_layer = _attention(q, k, v, relative, nn.Dropout(self.dropout), deterministic,
                               self.attention_implementation, name)
    return BertOutput(self.dropout, self.dtype, self.param_dtype, name='output')(
        context_layer.reshape(*x.shape[:-1], hidden), x, deterministic=deterministic)


class BertIntermediate(nn.Module):
  """HF BertIntermediate: exact (erf) GELU of a dense layer."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = torch_linear(self.features, x.shape[-1], name='dense', dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    return activations.gelu(x)


class BertLayer(nn.Module):
  """HF BertLayer (post-LN): self-attention, optional cross-attention, feed-forward.

  Attributes:
    num_heads: attention heads.
    intermediate_size: width of the feed-forward layer.
    max_positions: P of the relative-key self-attention term; None for none (HF "absolute"
      without embeddings, as in DualTrack's global encoder).
    cross_attention: add a cross-attention block to `encoder_states` (the fusion module).
    dropout: hidden and attention-probability dropout in training (HF default 0.1).
    dtype: computation dtype; param_dtype: parameter dtype.
    attention_implementation: 'einsum', 'xla' or 'cudnn' (module docstring).
  """
  num_heads: int
  intermediate_size: int
  max_positions: int | None = None
  cross_attention: bool = False
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array, encoder_states: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """Maps (B, N, D) to (B, N, D); `encoder_states` (B, M, D') iff `cross_attention`."""
    if self.cross_attention != (encoder_states is not None):
      raise ValueError(f'{_module_name(self)}: encoder_states must be given iff '
                       f'cross_attention (cross_attention={self.cross_attention})')
    kw = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
              attention_implementation=self.attention_implementation)
    x = BertAttention(self.num_heads, self.max_positions, name='attention', **kw)(
        x, deterministic=deterministic)
    if self.cross_attention:
      x = BertAttention(self.num_heads, None, name='crossattention', **kw)(
          x, encoder_states, deterministic=deterministic)
    h = BertIntermediate(self.intermediate_size, self.dtype, self.param_dtype,
                         name='intermediate')(x)
    return BertOutput(self.dropout, self.dtype, self.param_dtype, name='output')(
        h, x, deterministic=deterministic)


class BertEncoder(nn.Module):
  """HF BertEncoder called without masks: `num_layers` BertLayers `layer_0` .. `layer_{L-1}`.

  Attributes: `num_layers` and those of `BertLayer`.
  """
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int | None = None
  cross_attention: bool = False
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array, encoder_states: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """Maps (B, N, D) to the last hidden state (B, N, D); bidirectional, no mask."""
    for i in range(self.num_layers):
      x = BertLayer(self.num_heads, self.intermediate_size, self.max_positions,
                    self.cross_attention, self.dropout, self.dtype, self.param_dtype,
                    self.attention_implementation, name=f'layer_{i}')(
                        x, encoder_states, deterministic=deterministic)
    return x


class ViTEmbeddings(nn.Module):
  """HF ViTEmbeddings: conv patch embedding (with bias), CLS token first, learned positions."""
  patch_size: int
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (B, S, S, C) maps to (B, 1 + (S / patch)^2, hidden) tokens, patches row-major."""
    p = self.patch_size
    x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding='VALID', kernel_init=_VIT_INIT,
                dtype=self.dtype, param_dtype=self.param_dtype, name='patch_embeddings')(x)
    x = x.reshape(x.shape[0], -1, self.hidden)  # (h, w) row-major, as torch's flatten(2)
    cls = self.param('cls_token', _VIT_INIT, (1, 1, self.hidden), self.param_dtype)
    positions = self.param('position_embeddings', _VIT_INIT, (1, x.shape[1] + 1, self.hidden),
                           self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.hidden)), x],
                        axis=1)
    return x + positions.astype(x.dtype)


class ViTAttention(nn.Module):
  """HF ViTAttention (no dropout: ViTConfig defaults are 0): query, key, value, output dense."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(label: str) -> nn.Dense:
      return nn.Dense(x.shape[-1], kernel_init=_VIT_INIT, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=label)

    name = _module_name(self)
    q, k, v = (_split_heads(dense(label)(x), self.num_heads, name)
               for label in ('query', 'key', 'value'))
    out = _attention(q, k, v, None, None, True, self.attention_implementation, name)
    return dense('output')(out.reshape(x.shape))


class ViTLayer(nn.Module):
  """HF ViTLayer (pre-LN): x + attn(LN(x)), then x + W2 GELU(W1 LN(x))."""
  num_heads: int
  intermediate_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(LAYER_NORM_EPS, name='layernorm_before', **kw)(x)
    x = x + ViTAttention(self.num_heads, name='attention',
                         attention_implementation=self.attention_implementation, **kw)(h)
    h = nn.LayerNorm(LAYER_NORM_EPS, name='layernorm_after', **kw)(x)
    h = nn.Dense(self.intermediate_size, kernel_init=_VIT_INIT, name='intermediate', **kw)(h)
    h = activations.gelu(h)
    return x + nn.Dense(x.shape[-1], kernel_init=_VIT_INIT, name='output', **kw)(h)


class ViTEncoder(nn.Module):
  """Per-frame spatial ViT of the stage-2 local encoder (HF ViTModel without pooler), CLS output.

  Attributes:
    feature_map_size: S of the (S, S, C) input maps (16: the CNN's map of a 256 x 256 crop). HF
      refuses any other size without position interpolation, and so do we.
    patch_size: patch (and stride) of the embedding conv.
    hidden: token width; num_layers, num_heads, intermediate_size: the pre-LN layers.
    dtype: computation dtype; param_dtype: parameter dtype.
    attention_implementation: 'einsum', 'xla' or 'cudnn' (module docstring).
  """
  feature_map_size: int = 16
  patch_size: int = 2
  hidden: int = 64
  num_layers: int = 4
  num_heads: int = 4
  intermediate_size: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (B, S, S, C) feature maps to the final-LayerNorm CLS token (B, hidden)."""
    s = self.feature_map_size
    if x.ndim != 4 or x.shape[1:3] != (s, s):
      raise ValueError(f'{_module_name(self)}: input must be (B, {s}, {s}, C) feature maps '
                       f'(feature_map_size={s}), got shape {x.shape}')
    if s % self.patch_size:
      raise ValueError(f'{_module_name(self)}: feature_map_size {s} is not a multiple of '
                       f'patch_size {self.patch_size}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ViTEmbeddings(self.patch_size, self.hidden, name='embeddings', **kw)(x)
    for i in range(self.num_layers):
      x = ViTLayer(self.num_heads, self.intermediate_size, name=f'layer_{i}',
                   attention_implementation=self.attention_implementation, **kw)(x)
    return nn.LayerNorm(LAYER_NORM_EPS, name='layernorm', **kw)(x[:, 0])
