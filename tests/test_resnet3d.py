"""Tests of the DualTrack video ResNet (models/resnet3d.py) and the stage-1 local encoder."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtrack_jax.models import local_encoder
from dualtrack_jax.models import resnet3d

TINY = dict(widths=(4, 4, 8, 8), stem_width=4)  # XLA:CPU compiles 3D convs slowly: stay tiny.


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _paths(tree):
  """Flat {'a/b/c': leaf}; tuples (captured intermediates) count as leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
  return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


def numpy_conv3d(x, kernel, strides, padding):
  """Direct float64 cross-correlation, (B, T, H, W, C) x (kT, kH, kW, C, O), symmetric padding."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0)] + [(p, p) for p in padding] + [(0, 0)])
  kernel = np.asarray(kernel, np.float64)
  out_shape = [(x.shape[i + 1] - kernel.shape[i]) // strides[i] + 1 for i in range(3)]
  out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
  for a, b, c in np.ndindex(*kernel.shape[:3]):
    taps = tuple(slice(o, o + s * (n - 1) + 1, s)
                 for o, s, n in zip((a, b, c), strides, out_shape))
    out += x[(slice(None), *taps)] @ kernel[a, b, c]
  return out


@pytest.fixture(scope='module')
def tiny_net():
  """Tiny large-window VideoResNet and its variables (BN running stats still at init)."""
  model = resnet3d.VideoResNet(**TINY)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 2, 32, 32, 1)))


@pytest.fixture(scope='module')
def tiny_encoder():
  """Tiny stage-1 encoder, variables with non-trivial BN statistics, and a jitted apply."""
  model = local_encoder.LocalEncoderStage1(**TINY)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 2, 16, 16)))
  # One training step's statistics, so that eval mode is not the identity-BN special case.
  _, state = model.apply(variables, jax.random.uniform(jax.random.key(2), (2, 6, 16, 16)),
                         train=True, mutable=['batch_stats'])
  variables = {'params': variables['params'], **state}
  apply = jax.jit(functools.partial(model.apply, per_frame=True))
  return model, variables, apply


def test_default_parameter_count_and_torch_key_layout():
  model = resnet3d.VideoResNet()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 256, 256, 1)))
  assert _count(variables['params']) == 33_148_983  # the original's, with BN affine params
  params, stats = _paths(variables['params']), _paths(variables['batch_stats'])
  # torch: stem.0.weight (45, 1, 1, 7, 7); layer2.0.downsample.0.weight (128, 64, 1, 1, 1).
  assert params['stem/0/kernel'].shape == (1, 7, 7, 1, 45)
  assert params['stem/3/kernel'].shape == (3, 1, 1, 45, 64)
  assert params['layer2/0/downsample/0/kernel'].shape == (1, 1, 1, 64, 128)
  assert params['layer4/1/conv2/0/kernel'].shape == (3, 3, 3, 512, 512)
  assert params['layer4/1/conv2/1/scale'].shape == (512,)
  assert stats['layer3/0/downsample/1/var'].shape == (256,)
  assert len(params) == 21 + 42 and len(stats) == 2 * 21  # 21 convs, 21 BNs
  assert model.temporal_radius == 17


def test_small_window_variant():
  model = resnet3d.VideoResNet(temporal_kernels=resnet3d.SMALL_WINDOW)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 256, 256, 1)))
  assert _count(variables['params']) == 11_472_951  # the original's small-window CNN
  assert _paths(variables['params'])['layer2/0/conv1/0/kernel'].shape == (1, 3, 3, 64, 128)
  assert model.temporal_radius == 5


def test_bad_configuration_and_input_are_reported():
  x = jnp.zeros((1, 4, 32, 32, 1))
  with pytest.raises(ValueError, match='odd'):
    jax.eval_shape(resnet3d.VideoResNet(temporal_kernels=(3, 2, 1, 1)).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='one entry per layer'):
    jax.eval_shape(resnet3d.VideoResNet(temporal_kernels=(3, 3)).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'\(B, T, H, W, C\)'):
    jax.eval_shape(resnet3d.VideoResNet().init, jax.random.key(0), x[0])


def test_feature_map_of_256_input_is_16x16():
  model = resnet3d.VideoResNet(**TINY)
  x = jnp.zeros((2, 3, 256, 256, 1))
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
  assert out.shape == (2, 3, 16, 16, 8)


def test_convolutions_match_numpy_with_torch_padding(tiny_net):
  model, variables = tiny_net
  x = jax.random.uniform(jax.random.key(3), (1, 3, 32, 32, 1))
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  acts = {k.removesuffix('/__call__'): v[0] for k, v in _paths(state['intermediates']).items()}
  params = _paths(variables['params'])
  # Stem (1, 7, 7), stride (1, 2, 2), padding (0, 3, 3) on an even size.
  np.testing.assert_allclose(
      acts['stem/0'], numpy_conv3d(x, params['stem/0/kernel'], (1, 2, 2), (0, 3, 3)),
      rtol=1e-4, atol=1e-5)
  # Stride-2 3x3x3 conv of layer2 with symmetric padding 1 ("SAME" would pad (0, 1) here).
  layer1 = acts['layer1']
  assert layer1.shape == (1, 3, 16, 16, 4)
  np.testing.assert_allclose(
      acts['layer2/0/conv1/0'],
      numpy_conv3d(layer1, params['layer2/0/conv1/0/kernel'], (1, 2, 2), (1, 1, 1)),
      rtol=1e-4, atol=1e-5)
  # The 1x1x1 stride-2 downsample takes the even pixels.
  even_pixels = np.asarray(layer1)[:, :, ::2, ::2]
  np.testing.assert_allclose(
      acts['layer2/0/downsample/0'],
      even_pixels @ np.asarray(params['layer2/0/downsample/0/kernel'][0, 0, 0]),
      rtol=1e-4, atol=1e-5)
  assert acts['layer4'].shape == (1, 3, 2, 2, 8)


@pytest.mark.parametrize('kernel,strides', [((3, 3, 3), (1, 2, 2)), ((3, 1, 1), (1, 1, 1)),
                                            ((1, 7, 7), (1, 2, 2))])
def test_frame_conv_equals_the_native_3d_convolution(kernel, strides):
  x = jax.random.normal(jax.random.key(0), (2, 5, 8, 10, 3))
  conv = resnet3d.FrameConv(4, kernel, strides)
  variables = conv.init(jax.random.key(1), x)
  native = jax.lax.conv_general_dilated(
      x, variables['params']['kernel'], strides, [(k // 2, k // 2) for k in kernel],
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision='highest')
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(conv.apply(variables, x), native, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='temporal stride must be 1'):
    resnet3d.FrameConv(4, kernel, (2, 1, 1)).init(jax.random.key(1), x)


def test_frame_conv_in_chunks_equals_one_pass_with_gradients(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 6, 3))
  conv = resnet3d.FrameConv(4, (3, 3, 3), (1, 2, 2))
  variables = conv.init(jax.random.key(1), x)

  def loss(variables, x):
    y = conv.apply(variables, x)
    return jnp.sum(y * jnp.cos(y)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
  (_, whole), whole_grads = grad(variables, x)
  # 3 frames per chunk: chunks start at frames 0, 3 and 4 (the last one ends at the sweep end);
  # differentiated, the one-pass form runs.
  monkeypatch.setattr(resnet3d, 'CHUNK_BYTES', 3 * 2 * 6 * 6 * 3 * 4)
  chunked_apply = jax.jit(conv.apply)
  assert 'while' in chunked_apply.lower(variables, x).as_text()
  np.testing.assert_allclose(chunked_apply(variables, x), whole, rtol=1e-6, atol=1e-6)
  _, chunked_grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables, x)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_norm_train_mode_updates_statistics_with_momentum_0_9(tiny_net):
  model, variables = tiny_net
  x = jax.random.uniform(jax.random.key(4), (2, 3, 32, 32, 1))
  _, state = model.apply(variables, x, train=True, capture_intermediates=True,
                         mutable=['batch_stats', 'intermediates'])
  acts = _paths(state['intermediates'])
  new_stats = _paths(state['batch_stats'])
  assert len(new_stats) == 2 * 21
  for path, value in new_stats.items():
    bn, stat = path.rsplit('/', 1)
    parent, index = bn.rsplit('/', 1)
    conv_out = np.asarray(acts[f'{parent}/{int(index) - 1}/__call__'][0], np.float64)
    # torch's update: the running variance takes the unbiased batch variance (ddof=1).
    batch = (conv_out.mean((0, 1, 2, 3)) if stat == 'mean'
             else conv_out.var((0, 1, 2, 3), ddof=1))
    init = 0.0 if stat == 'mean' else 1.0
    np.testing.assert_allclose(value, 0.9 * init + 0.1 * batch, rtol=1e-4, atol=1e-6,
                               err_msg=path)


@pytest.mark.parametrize('kernels, radius', [(resnet3d.LARGE_WINDOW, 17),
                                             (resnet3d.SMALL_WINDOW, 5)])
def test_temporal_receptive_field(kernels, radius):
  model = resnet3d.VideoResNet(temporal_kernels=kernels, **TINY)
  assert model.temporal_radius == radius
  x = jax.random.uniform(jax.random.key(5), (1, 42, 16, 16, 1))
  variables = model.init(jax.random.key(6), x[:, :2])
  apply = jax.jit(model.apply)
  t = 20
  perturbed = x.at[:, t].add(jax.random.normal(jax.random.key(7), x.shape[2:]))
  change = np.abs(np.asarray(apply(variables, perturbed) - apply(variables, x))).max((0, 2, 3, 4))
  inside = np.arange(42)[np.abs(np.arange(42) - t) <= radius]
  assert np.all(change[inside] > 0), change
  outside = np.setdiff1d(np.arange(42), inside)
  np.testing.assert_array_equal(change[outside], 0.0)


def test_local_encoder_outputs_and_input_checks(tiny_encoder):
  model, variables, apply = tiny_encoder
  assert set(variables['params']) == {'backbone', 'fc'}
  assert variables['params']['fc']['kernel'].shape == (8, 6)
  x = jax.random.uniform(jax.random.key(8), (2, 5, 16, 16))
  out = model.apply(variables, x)
  assert out.shape == (2, 4, 6)
  np.testing.assert_allclose(out, apply(variables, x[..., None])[:, 1:], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='divide uint8'):
    model.apply(variables, jnp.zeros((1, 4, 16, 16), jnp.uint8))
  with pytest.raises(ValueError, match=r'\(B, T, H, W\)'):
    model.apply(variables, jnp.zeros((1, 4, 16, 16, 3)))


def test_predict_sweep_tiled_equals_whole_sweep(tiny_encoder):
  model, variables, apply = tiny_encoder
  x = jax.random.uniform(jax.random.key(9), (1, 50, 16, 16))
  whole = apply(variables, x)[:, 1:]
  # Windows of 8 + 2 * 17 = 42 frames at starts 0 and 8.
  tiled = local_encoder.predict_sweep(model, variables, x, tile=8)
  assert tiled.shape == (1, 49, 6)
  np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='receptive'):
    local_encoder.predict_sweep(model, variables, x, tile=8, halo=16)


def test_bfloat16_compute_keeps_float32_params(tiny_encoder):
  model, variables, apply = tiny_encoder
  bf16 = local_encoder.LocalEncoderStage1(**TINY, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(10), (1, 6, 16, 16))
  init = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  out = bf16.apply(variables, x)
  ref = apply(variables, x)[:, 1:]
  assert out.dtype == jnp.float32
  rel = np.linalg.norm(np.asarray(out - ref)) / np.linalg.norm(np.asarray(ref))
  assert rel < 0.05, rel
