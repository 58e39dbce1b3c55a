"""Which computation runs multi-head attention: the models' own einsums or a fused kernel.

Every attention of SONICHU's ViT and DualTrack's ViT and BERTs computes softmax(q k^T s + b) v.
`IMPLEMENTATIONS` names the ways it can run, chosen per model by its `attention_implementation`
attribute (the config key of the same name):
- 'einsum' (the default): the model's explicit einsum-softmax-einsum code, as it was written
  against the PyTorch originals; the reference the others are tested against.
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`, the same math as one library
  call (float32 logits and softmax, whatever the compute dtype).
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused (flash)
  attention, GPU only: it never holds the (T, S) probabilities in GPU memory.

The fused kernel covers only what cuDNN supports: half-precision inputs (bfloat16, float16) and a
head size that is a multiple of 8 up to 128. Where an attention falls outside that, and where
attention dropout is active (training with dropout > 0: neither library call has dropout), the
model's einsum path runs instead; the result is the same computation.
"""
import jax
import jax.numpy as jnp

from ultrasound_common import errors

IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn')
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_SIZE = 128


def check(implementation: str, owner: str) -> None:
  """Refuses an unknown implementation, and 'cudnn' off GPU, naming the config key."""
  if implementation not in IMPLEMENTATIONS:
    raise errors.InputError(f'{owner}: attention_implementation={implementation!r} is not one '
                            f'of {", ".join(IMPLEMENTATIONS)}')
  backend = jax.default_backend()
  if implementation == 'cudnn' and backend != 'gpu':
    raise errors.InputError(
        f"{owner}: attention_implementation='cudnn' needs an NVIDIA GPU (cuDNN's fused "
        f"attention), but JAX runs on {backend}; use 'xla' or 'einsum' (the same result)")


def fused(implementation: str, query: jax.Array, *, dropout_active: bool, owner: str) -> str | None:
  """The `jax.nn.dot_product_attention` implementation for this call, or None for the einsums.

  Args:
    implementation: the model's attention_implementation.
    query: (B, T, heads, head size) queries, for cuDNN's dtype and head-size limits.
    dropout_active: attention-probability dropout applies in this call.
    owner: the module, for error messages.
  """
  check(implementation, owner)
  if implementation == 'einsum' or dropout_active:
    return None
  if implementation == 'cudnn':
    head_size = query.shape[-1]
    if (query.dtype not in _CUDNN_DTYPES or head_size % 8
        or head_size > _CUDNN_MAX_HEAD_SIZE):
      return None
  return implementation


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          implementation: str, *, bias: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` over (B, T, heads, head size) arrays.

  Args:
    query, key, value: (B, T, N, H), (B, S, N, H), (B, S, N, H).
    implementation: 'xla' or 'cudnn' (from `fused`).
    bias: added to the scaled logits, (B or 1, N or 1, T, S); cuDNN takes it in the inputs' dtype.
    scale: of the logits; None is 1 / sqrt(H).
  """
  if bias is not None and implementation == 'cudnn':
    bias = bias.astype(query.dtype)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, scale=scale,
                                      implementation=implementation)
