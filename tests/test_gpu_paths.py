"""The accelerator paths (docs/performance.md): each switch computes what the default path does.

Every alternative runs on the CPU against the default at tiny sizes, in float32, to 1e-5:
attention through `jax.nn.dot_product_attention` ('xla'; 'cudnn' is refused off GPU), the
ViTPose head's deconvolutions as sub-pixel convolutions, DualTrack's 3D convolutions as XLA's
native 3D convolution, and inference with BatchNorm folded into the convolutions. None of them
changes the parameter tree (checkpoints and converters keep working), except folding, whose
variables are exactly those of the model built with fold_batch_norm=True.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtrack_jax import benchmarks as dualtrack_benchmarks
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer
from launch import bench_inference
from sonichu_jax import benchmarks as sonichu_benchmarks
from sonichu_jax import export as sonichu_export
from sonichu_jax.models import heads
from sonichu_jax.models import sonichu
from ultrasound_common import batch_norm
from ultrasound_common import errors

TOL = 1e-5

SONICHU = dict(tasks=('HC',), patch_size=8, embed_dim=32, depth=2, num_heads=4, head_filters=16)
SONICHU_SWITCHES = {'attention xla': dict(attention_implementation='xla'),
                    'transposed deconv': dict(deconv_implementation='transposed')}
# Every part of DualTrack at toy widths: 3D CNN (two layers with temporal kernels), ViT, temporal
# BERT (relative-key), global 2D CNN and BERT, fusion (relative-key and cross-attention).
DUALTRACK = dict(
    max_positions=64, hidden=32, fusion_layers=1, fusion_heads=2, local_cnn_widths=(8, 8, 8, 8),
    local_cnn_stem_width=4, local_cnn_temporal_kernels=(3, 3, 1, 1), vit_feature_map_size=2,
    vit_patch_size=1, vit_layers=1, temporal_layers=1, temporal_heads=2,
    global_cnn_widths=(4, 4, 4, 4), global_cnn_stem_width=4, global_layers=1, global_heads=2)
DUALTRACK_SWITCHES = {'attention xla': dict(attention_implementation='xla'),
                      'native conv3d': dict(conv3d_implementation='native')}


def _noise_variables(variables, seed: int):
  """The tree with seeded noise: BN variances in (0.5, 2), everything else shifted by N(0, 0.1)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return (np.asarray(leaf) + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _assert_close(out, ref):
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=TOL)


@pytest.fixture(scope='module')
def sonichu_case():
  """(variables, images, the default model's heatmaps) of a tiny SONICHU."""
  model = sonichu.SonichuModel(**SONICHU)
  variables = _noise_variables(sonichu.init_variables(model, jax.random.key(0), (32, 32)), 0)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
  return variables, images, _sonichu_heatmaps(model, variables, images)


def _sonichu_heatmaps(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, 'HC', method=sonichu.SonichuModel.heatmaps))(
      variables, images)


@pytest.mark.parametrize('switch', sorted(SONICHU_SWITCHES))
def test_sonichu_switch_equals_default(sonichu_case, switch):
  variables, images, reference = sonichu_case
  model = sonichu.SonichuModel(**SONICHU, **SONICHU_SWITCHES[switch])
  shapes = jax.eval_shape(lambda: sonichu.init_variables(model, jax.random.key(0), (32, 32)))
  assert _shapes(shapes) == _shapes(variables)  # The same checkpoints.
  _assert_close(_sonichu_heatmaps(model, variables, images), reference)


def test_sonichu_folded_batch_norm_equals_default(sonichu_case):
  variables, images, reference = sonichu_case
  folded = sonichu.fold_batch_norm(variables)
  model = sonichu.SonichuModel(**SONICHU, fold_batch_norm=True, deconv_implementation='transposed')
  shapes = jax.eval_shape(lambda: sonichu.init_variables(model, jax.random.key(0), (32, 32)))
  assert _shapes(shapes) == _shapes(folded)
  assert 'batch_stats' not in folded and 'batch_stats' in variables  # The input is unchanged.
  _assert_close(_sonichu_heatmaps(model, folded, images), reference)


@pytest.mark.parametrize('hw', [(3, 5), (4, 4)])
def test_subpixel_conv_transpose_is_torch_conv_transpose(hw):
  """Against Flax's ConvTranspose as heads.py configures it (torch's k=4, s=2, p=1), O != I."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, *hw, 3)), jnp.float32)
  layer = nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                           transpose_kernel=True, use_bias=False)
  variables = layer.init(jax.random.key(3), x)
  out = heads.subpixel_conv_transpose(x, variables['params']['kernel'])
  assert out.shape == (2, 2 * hw[0], 2 * hw[1], 5)
  _assert_close(out, layer.apply(variables, x))


def test_cudnn_attention_refused_off_gpu(sonichu_case):
  if jax.default_backend() == 'gpu':
    pytest.skip('cuDNN attention is available here')
  variables, images, _ = sonichu_case
  model = sonichu.SonichuModel(**SONICHU, attention_implementation='cudnn')
  with pytest.raises(errors.InputError, match="attention_implementation='cudnn' needs"):
    jax.eval_shape(lambda: model.apply(variables, images, 'HC'))


@pytest.mark.parametrize('field, value', [('attention_implementation', 'flash'),
                                          ('deconv_implementation', 'pixelshuffle')])
def test_unknown_switch_values_are_refused(sonichu_case, field, value):
  variables, images, _ = sonichu_case
  model = sonichu.SonichuModel(**SONICHU, **{field: value})
  with pytest.raises(errors.InputError, match=field):
    jax.eval_shape(lambda: model.apply(variables, images, 'HC'))


def test_attention_dropout_keeps_the_einsum_path():
  """In training with dropout, 'xla' runs the einsums (the library call has no dropout)."""
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 16)), jnp.float32)
  layer = transformer.BertAttention(num_heads=2, max_positions=8, dropout=0.5)
  variables = layer.init(jax.random.key(0), x)
  rngs = {'dropout': jax.random.key(5)}
  def apply(module):
    return jax.jit(lambda v: module.apply(v, x, deterministic=False, rngs=rngs))(variables)

  reference = apply(layer)
  out = apply(layer.clone(attention_implementation='xla'))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))


@pytest.fixture(scope='module')
def dualtrack_case():
  """(variables, inputs, the default model's poses) of a toy DualTrack, 6 frames."""
  rng = np.random.default_rng(0)
  local = rng.random((1, 6, 32, 32), np.float32)
  global_ = rng.random((1, 1, 32, 32), np.float32)
  model = dualtrack.DualTrack(**DUALTRACK)
  variables = dualtrack_benchmarks.random_variables(model, local, global_, 0)
  return variables, (local, global_), jax.jit(model.apply)(variables, local, global_)


@pytest.mark.parametrize('switch', sorted(DUALTRACK_SWITCHES))
def test_dualtrack_switch_equals_default(dualtrack_case, switch):
  variables, inputs, reference = dualtrack_case
  model = dualtrack.DualTrack(**DUALTRACK, **DUALTRACK_SWITCHES[switch])
  assert _shapes(jax.eval_shape(model.init, jax.random.key(0), *inputs)) == _shapes(variables)
  _assert_close(jax.jit(model.apply)(variables, *inputs), reference)


def test_dualtrack_folded_batch_norm_equals_default(dualtrack_case):
  variables, inputs, reference = dualtrack_case
  folded = dualtrack.fold_batch_norm(variables)
  model = dualtrack.DualTrack(**DUALTRACK, fold_batch_norm=True)
  assert _shapes(jax.eval_shape(model.init, jax.random.key(0), *inputs)) == _shapes(folded)
  _assert_close(jax.jit(model.apply)(folded, *inputs), reference)
  with pytest.raises(errors.InputError, match='fold_batch_norm is for inference'):
    jax.eval_shape(lambda: model.clone(local_frozen='none').apply(
        folded, *inputs, train=True, rngs={'dropout': jax.random.key(0)}))


@pytest.mark.parametrize('causal', [False, True])
def test_native_conv3d_equals_frame_conv(causal):
  """Strided and causal 3D convolutions, the frame loop (chunks of 2 frames) included."""
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 7, 6, 6, 3)), jnp.float32)
  layer = resnet3d.FrameConv(4, (3, 3, 3), (1, 2, 2), causal=causal)
  variables = layer.init(jax.random.key(7), x)
  native = jax.jit(layer.clone(implementation='native').apply)(variables, x)
  chunk_bytes = resnet3d.CHUNK_BYTES
  resnet3d.CHUNK_BYTES = 2 * x[0, 0].size * 4 * x.shape[0]
  try:  # Read when traced.
    looped = jax.jit(layer.apply)(variables, x)
  finally:
    resnet3d.CHUNK_BYTES = chunk_bytes
  _assert_close(native, looped)


def test_fold_needs_a_convolution_before_each_batch_norm():
  variables = {'params': {'norm': {'scale': np.ones(2), 'bias': np.zeros(2)}},
               'batch_stats': {'norm': {'mean': np.zeros(2), 'var': np.ones(2)}}}
  with pytest.raises(errors.InputError, match='BatchNorm norm has no bias-free convolution'):
    batch_norm.fold(variables)


def test_benchmark_cases_take_the_switches():
  """`--model_options` reaches the model and the variables: the case computes the same poses."""
  geometry = dualtrack_benchmarks.Geometry(local_hw=(32, 32), global_hw=(32, 32))
  options = bench_inference.Options(sizes=(6,), steps=1, model_options=(
      'attention_implementation=xla', 'conv3d_implementation=native', 'fold_batch_norm=true'))
  (case,) = dualtrack_benchmarks.cases(options, geometry=geometry, overrides=DUALTRACK)
  assert 'conv3d_implementation=native, fold_batch_norm=true' in case['label']
  (variant,) = case['variants']
  assert 'batch_stats' not in variant['variables']
  (default,) = dualtrack_benchmarks.cases(bench_inference.Options(sizes=(6,)),
                                          geometry=geometry, overrides=DUALTRACK)
  outputs = [jax.jit(c['variants'][0]['fn'])(c['variants'][0]['variables'], *c['inputs'])
             for c in (case, default)]
  _assert_close(*outputs)


@pytest.mark.parametrize('texts, match', [
    (('fold_batch_norm=yes',), "fold_batch_norm='yes' is not one of false, true"),
    (('deconv_implementation=transposed',), 'KEY one of attention_implementation, conv3d'),
    (('attention_implementation',), 'is not KEY=VALUE')])
def test_benchmark_switches_are_checked(texts, match):
  options = bench_inference.Options(model_options=texts)
  with pytest.raises(errors.InputError, match=match):
    next(dualtrack_benchmarks.cases(options))
  if 'deconv' not in texts[0]:
    with pytest.raises(errors.InputError, match='--model_options'):
      next(sonichu_benchmarks.cases(options))


def test_export_option_fold_batch_norm():
  """Export option fold_batch_norm=true: folded variables, the same exported function."""
  images = jnp.asarray(np.random.default_rng(8).random((2, 256, 256, 3)), jnp.float32)
  model = sonichu.SonichuModel(**{**SONICHU, 'patch_size': 64})  # 256 x 256 in 4 x 4 patches.
  variables = _noise_variables(sonichu.init_variables(model, jax.random.key(0), (256, 256)), 0)
  outputs = []
  for fold in ('false', 'true'):
    spec = sonichu_export.keypoints_spec(model, variables, ('HC',), False,
                                         {'fold_batch_norm': fold})
    assert spec['options']['fold_batch_norm'] == fold
    assert ('batch_stats' in spec['variables']) == (fold == 'false')
    outputs.append(jax.jit(spec['fn'])(spec['variables'], images)['keypoints_HC'])
  _assert_close(*outputs)
  with pytest.raises(errors.InputError, match='fold_batch_norm'):
    sonichu_export.keypoints_spec(model, variables, ('HC',), False, {'fold_batch_norm': 'maybe'})
