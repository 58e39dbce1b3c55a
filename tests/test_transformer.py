"""Tests of the BERT and ViT blocks (models/transformer.py) against float64 NumPy references.

The references follow HF transformers' BertLayer (relative_key, eager) and ViTLayer term by term,
with the relative-key embeddings gathered naively as E[l - r + P - 1], so the skewed computation
of the module is checked against the definition.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from dualtrack_jax.models import transformer

HIDDEN, HEADS, INTER, P = 16, 4, 12, 6
BERT = transformer.BertEncoder(2, HEADS, INTER, max_positions=P, cross_attention=True)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_params(module, *args, seed=0):
  """Noise parameters of the module's shapes (LayerNorm scales around 1): no term is trivial.

  jax.eval_shape gives the tree without compiling the initialisers (slow on CPU).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.float32(0.4 * rng.normal(size=x.shape) + (path[-1].key == 'scale')),
      shapes)


# ---------------------------------------------------------------- NumPy references (float64)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-12) * p['scale'] + p['bias']


def np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def np_gelu(x):
  return 0.5 * x * (1 + special.erf(x / math.sqrt(2)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_heads(x, heads):
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def np_attention_core(p, x, source, heads, max_positions):
  q, k, v = (np_heads(np_dense(inp, p[name]), heads)
             for name, inp in (('query', x), ('key', source), ('value', source)))
  logits = np.einsum('blhd,brhd->bhlr', q, k)
  if max_positions is not None:
    n = x.shape[1]
    distance = np.arange(n)[:, None] - np.arange(n)[None, :]
    table = p['distance_embedding']['embedding'][distance + max_positions - 1]  # (N, N, d)
    logits = logits + np.einsum('blhd,lrd->bhlr', q, table)
  probs = np_softmax(logits / math.sqrt(q.shape[-1]))
  return np.einsum('bhlr,brhd->blhd', probs, v).reshape(x.shape)


def np_bert_attention(p, x, source, heads, max_positions):
  ctx = np_attention_core(p, x, source, heads, max_positions)
  return np_layer_norm(np_dense(ctx, p['output']['dense']) + x, p['output']['LayerNorm'])


def np_bert_layer(p, x, context, heads, max_positions):
  x = np_bert_attention(p['attention'], x, x, heads, max_positions)
  if context is not None:
    x = np_bert_attention(p['crossattention'], x, context, heads, None)
  h = np_gelu(np_dense(x, p['intermediate']['dense']))
  return np_layer_norm(np_dense(h, p['output']['dense']) + x, p['output']['LayerNorm'])


def np_vit(p, x, patch, heads):
  b, s, _, c = x.shape
  g = s // patch
  patches = x.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  kernel = p['embeddings']['patch_embeddings']['kernel']  # (p, p, C, D)
  tokens = np.einsum('bghijc,ijcd->bghd', patches, kernel).reshape(b, g * g, -1)
  tokens = tokens + p['embeddings']['patch_embeddings']['bias']
  cls = np.broadcast_to(p['embeddings']['cls_token'], (b, 1, tokens.shape[-1]))
  h = np.concatenate([cls, tokens], 1) + p['embeddings']['position_embeddings']
  for i in range(sum(k.startswith('layer_') for k in p)):
    lp = p[f'layer_{i}']
    y = np_layer_norm(h, lp['layernorm_before'])
    attended = np_attention_core(lp['attention'], y, y, heads, None)
    h = h + np_dense(attended, lp['attention']['output'])
    y = np_gelu(np_dense(np_layer_norm(h, lp['layernorm_after']), lp['intermediate']))
    h = h + np_dense(y, lp['output'])
  return np_layer_norm(h, p['layernorm'])[:, 0]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def bert():
  """Variables of the 2-layer relative-key + cross-attention BERT and its jitted apply."""
  x, ctx = jnp.zeros((2, 5, HIDDEN)), jnp.zeros((2, 3, HIDDEN))
  params = _random_params(BERT, x, ctx)
  return params, jax.jit(BERT.apply, static_argnames='deterministic')


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize('n', [1, 2, 5, 6])
def test_relative_key_logits_equal_naive_gather(n):
  rng = np.random.default_rng(n)
  q, table = rng.normal(size=(2, n, 3, 4)), rng.normal(size=(2 * P - 1, 4))
  distance = np.arange(n)[:, None] - np.arange(n)[None, :]
  expected = np.einsum('blhd,lrd->bhlr', q, table[distance + P - 1])
  q, table = q.astype(np.float32), table.astype(np.float32)
  np.testing.assert_allclose(transformer.relative_key_logits(q, table), expected, rtol=1e-5,
                             atol=1e-5)


def test_relative_key_logits_never_build_per_pair_embeddings():
  # N = 512, d = 64: a gathered (N, N, d) table would be 16.8 M elements per call.
  n, heads, d = 512, 2, 64
  q = jax.ShapeDtypeStruct((1, n, heads, d), jnp.float32)
  table = jax.ShapeDtypeStruct((2 * 1024 - 1, d), jnp.float32)
  jaxpr = jax.make_jaxpr(transformer.relative_key_logits)(q, table)
  largest = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars)
  assert largest == heads * n * (2 * n - 1)  # the (N, 2N - 1) scores per head, nothing bigger


@pytest.mark.parametrize('n', [5, P])
def test_bert_encoder_matches_numpy_reference(bert, n):
  params, apply = bert
  x = jax.random.normal(jax.random.key(2), (2, n, HIDDEN))
  ctx = jax.random.normal(jax.random.key(3), (2, 3, HIDDEN))
  expected = np.asarray(x, np.float64)
  for i in range(2):
    expected = np_bert_layer(_np(params[f'layer_{i}']), expected, np.asarray(ctx, np.float64),
                             HEADS, P)
  np.testing.assert_allclose(apply({'params': params}, x, ctx), expected, rtol=1e-4, atol=1e-4)


def test_parameter_tree_follows_hf_names(bert):
  params, _ = bert
  assert set(params) == {'layer_0', 'layer_1'}
  layer = params['layer_0']
  assert set(layer) == {'attention', 'crossattention', 'intermediate', 'output'}
  assert set(layer['attention']) == {'query', 'key', 'value', 'distance_embedding', 'output'}
  assert layer['attention']['distance_embedding']['embedding'].shape == (2 * P - 1, HIDDEN // HEADS)
  assert set(layer['crossattention']) == {'query', 'key', 'value', 'output'}  # no positional term
  assert set(layer['output']) == {'dense', 'LayerNorm'}
  assert layer['intermediate']['dense']['kernel'].shape == (HIDDEN, INTER)


def test_sequence_longer_than_table_is_refused(bert):
  params, _ = bert
  x, ctx = jnp.zeros((1, P + 1, HIDDEN)), jnp.zeros((1, 2, HIDDEN))
  with pytest.raises(ValueError, match=r'layer_0/attention: 7 frames > 6 positions'):
    jax.eval_shape(functools.partial(BERT.apply, {'params': params}), x, ctx)


def test_attention_is_bidirectional(bert):
  params, apply = bert
  x = jax.random.normal(jax.random.key(4), (1, 5, HIDDEN))
  ctx = jax.random.normal(jax.random.key(5), (1, 3, HIDDEN))
  base = apply({'params': params}, x, ctx)
  later = apply({'params': params}, x.at[:, -1].add(1.0), ctx)
  assert np.abs(np.asarray(later - base))[0, 0].max() > 1e-3  # the last frame changes the first


def test_dropout_only_in_training_and_driven_by_the_rng(bert):
  params, apply = bert
  x = jax.random.normal(jax.random.key(6), (2, 5, HIDDEN))
  ctx = jax.random.normal(jax.random.key(7), (2, 3, HIDDEN))
  evaluate = apply({'params': params}, x, ctx)
  train = lambda seed: apply({'params': params}, x, ctx, deterministic=False,
                             rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(np.asarray(train(0) - train(1))).max() > 1e-3
  assert np.abs(np.asarray(train(0) - evaluate)).max() > 1e-3
  no_dropout = transformer.BertEncoder(2, HEADS, INTER, P, True, dropout=0.0)
  np.testing.assert_allclose(
      no_dropout.apply({'params': params}, x, ctx, deterministic=False,
                       rngs={'dropout': jax.random.key(0)}), evaluate, rtol=1e-6, atol=1e-6)


def test_plain_encoder_and_argument_checks():
  plain = transformer.BertEncoder(1, HEADS, INTER)  # the global encoder's kind: no table, no cross
  x = jax.random.normal(jax.random.key(8), (2, 4, HIDDEN))
  params = _random_params(plain, x, seed=1)
  assert set(params['layer_0']['attention']) == {'query', 'key', 'value', 'output'}
  assert 'crossattention' not in params['layer_0']
  expected = np_bert_layer(_np(params['layer_0']), np.asarray(x, np.float64), None, HEADS, None)
  np.testing.assert_allclose(plain.apply({'params': params}, x), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='iff cross_attention'):
    plain.apply({'params': params}, x, x)
  with pytest.raises(ValueError, match='iff cross_attention'):
    jax.eval_shape(BERT.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='not a multiple of the 3 heads'):
    jax.eval_shape(transformer.BertEncoder(1, 3, INTER).init, jax.random.key(0), x)


def test_vit_matches_numpy_reference_and_hf_layout():
  vit = transformer.ViTEncoder(feature_map_size=4, patch_size=2, hidden=8, num_layers=2,
                               num_heads=2, intermediate_size=6)
  x = jax.random.normal(jax.random.key(10), (3, 4, 4, 5))
  params = _random_params(vit, x, seed=2)
  emb = params['embeddings']
  assert emb['cls_token'].shape == (1, 1, 8) and emb['position_embeddings'].shape == (1, 5, 8)
  assert emb['patch_embeddings']['kernel'].shape == (2, 2, 5, 8)
  assert set(params['layer_1']) == {'attention', 'intermediate', 'output', 'layernorm_before',
                                    'layernorm_after'}
  assert set(params['layer_1']['attention']) == {'query', 'key', 'value', 'output'}
  expected = np_vit(_np(params), np.asarray(x, np.float64), 2, 2)
  np.testing.assert_allclose(jax.jit(vit.apply)({'params': params}, x), expected, rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match=r'\(B, 4, 4, C\)'):
    vit.apply({'params': params}, x[:, :2, :2])


def test_released_sizes():
  def count(module, *shapes):
    args = [jnp.zeros(s) for s in shapes]
    return _count(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])
  # The original's sizes (docs/dualtrack.md, section "Parameter counts").
  assert count(transformer.ViTEncoder(), (1, 16, 16, 512)) == 219_840
  assert count(transformer.BertEncoder(4, 4, 32, max_positions=1024), (1, 2, 64)) == 215_360
  assert count(transformer.BertEncoder(4, 4, 32, max_positions=4096), (1, 2, 64)) == 608_576
  assert count(transformer.BertEncoder(8, 8, 1024), (1, 2, 512)) == 16_822_272
  assert count(transformer.BertEncoder(12, 8, 1024, 1024, True), (1, 2, 512),
               (1, 2, 512)) == 39_425_280


def test_initialisation_follows_the_original():
  layer = transformer.BertEncoder(1, 2, 32, max_positions=64)
  params = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 2, 64)))['params']['layer_0']
  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
  for dense, fan_in in ((params['attention']['query'], 64), (params['output']['dense'], 32)):
    bound = 1 / math.sqrt(fan_in)
    for leaf in (dense['kernel'], dense['bias']):
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
    assert abs(float(np.std(dense['kernel'])) - bound / math.sqrt(3)) < 0.1 * bound
  table = params['attention']['distance_embedding']['embedding']  # torch nn.Embedding: N(0, 1)
  assert 0.9 < float(np.std(table)) < 1.1
  ln = params['output']['LayerNorm']
  np.testing.assert_array_equal(ln['scale'], 1.0)
  np.testing.assert_array_equal(ln['bias'], 0.0)
  vit = transformer.ViTEncoder(feature_map_size=4, hidden=64)
  vit = jax.jit(vit.init)(jax.random.key(1), jnp.zeros((1, 4, 4, 64)))['params']
  # HF ViT _init_weights: N(0, 0.02) weights, zero biases.
  assert 0.018 < float(np.std(vit['embeddings']['patch_embeddings']['kernel'])) < 0.022
  np.testing.assert_array_equal(vit['layer_0']['attention']['query']['bias'], 0.0)


def test_bfloat16_compute_keeps_float32_params(bert):
  params, apply = bert
  bf16 = transformer.BertEncoder(2, HEADS, INTER, P, True, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(12), (2, 5, HIDDEN))
  ctx = jax.random.normal(jax.random.key(13), (2, 3, HIDDEN))
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x, ctx)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out = bf16.apply({'params': params}, x, ctx)
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(apply({'params': params}, x, ctx))
  rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 0.05, rel
