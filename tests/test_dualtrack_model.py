"""Tests of the assembled DualTrack model and its encoders (models/dualtrack.py, resnet2d.py).

Sizes of the released presets come from jax.eval_shape (nothing is allocated). Numerics use tiny
widths, 32 x 32 frames (2 x 2 CNN feature maps) and the small-window CNN (receptive radius 5).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import local_encoder
from dualtrack_jax.models import resnet2d
from dualtrack_jax.models import resnet3d

CNN = dict(cnn_widths=(4, 4, 8, 8), cnn_stem_width=4)
TINY_LOCAL = dict(**CNN, cnn_temporal_kernels=resnet3d.SMALL_WINDOW, vit_feature_map_size=2,
                  vit_patch_size=1, vit_layers=1, vit_heads=2, vit_intermediate=8, hidden=8,
                  temporal_layers=1, temporal_heads=2, temporal_intermediate=8, max_positions=40)
TINY = dict(max_positions=40, grid_spacing=4, hidden=16, fusion_layers=2, fusion_heads=2,
            local_cnn_widths=(4, 4, 8, 8), local_cnn_stem_width=4,
            local_cnn_temporal_kernels=resnet3d.SMALL_WINDOW, vit_feature_map_size=2,
            vit_patch_size=1, vit_layers=1, vit_heads=2, vit_intermediate=8, local_hidden=8,
            temporal_layers=1, temporal_heads=2, temporal_intermediate=8,
            global_cnn_widths=(4, 4, 8, 8), global_cnn_stem_width=4, global_layers=1,
            global_heads=2)
N = 10  # frames of the tiny sweeps; grid spacing 4 -> global frames 0, 4, 8


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def _random_variables(module, *args, seed=0, **kwargs):
  """Noise parameters and positive BN statistics of the module's shapes.

  jax.eval_shape gives the tree without compiling the initialisers (slow on CPU); non-trivial
  running statistics make eval-mode batch norm differ from train mode.
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == 'var':
      return np.float32(rng.uniform(0.5, 2.0, x.shape))
    scale = 0.1 if name == 'mean' else 0.3
    return np.float32(scale * rng.normal(size=x.shape) + (name == 'scale'))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _frames(seed, *shape):
  return jax.random.uniform(jax.random.key(seed), shape)


# ---------------------------------------------------------------- released presets


@pytest.mark.parametrize('preset, total, parts', [
    (dualtrack.TUS_REC_2024, 101_853_702,
     dict(global_encoder=28_807_613, local_encoder=33_617_731, fusion=39_425_280, head=3_078)),
    (dualtrack.TUS_REC_2025, 108_538_374,
     dict(global_encoder=30_380_477, local_encoder=34_010_947, fusion=44_143_872, head=3_078)),
])
def test_released_presets_have_the_original_sizes_and_tree(preset, total, parts):
  model = dualtrack.DualTrack(**preset)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 256, 256)),
                             jnp.zeros((1, 2, 224, 224)))
  params = variables['params']
  assert _count(params) == total  # docs/dualtrack.md, section "Parameter counts"
  assert {k: _count(v) for k, v in params.items()} == parts
  # 728 torch parameters; 42 BNs x (running_mean, running_var) (num_batches_tracked dropped).
  assert len(jax.tree.leaves(params)) == 728
  assert len(jax.tree.leaves(variables['batch_stats'])) == 84
  p = preset['max_positions']
  local, glob = params['local_encoder'], params['global_encoder']
  assert set(local) == {'cnn', 'vit', 'vit_fc', 'temporal', 'temporal_fc', 'proj'}
  assert set(glob) == {'backbone', 'proj', 'pos_emb', 'bert', 'fc'}
  assert glob['pos_emb']['embedding'].shape == (p, 512)
  assert glob['backbone']['stem']['3']['kernel'].shape == (3, 3, 45, 64)
  assert local['cnn']['stem']['3']['kernel'].shape == (3, 1, 1, 45, 64)
  assert local['vit']['embeddings']['patch_embeddings']['kernel'].shape == (2, 2, 512, 64)
  assert local['proj'] == {'kernel': jax.ShapeDtypeStruct((64, 512), jnp.float32)}
  rel = lambda tree: tree['layer_0']['attention']['distance_embedding']['embedding'].shape
  assert rel(local['temporal']) == (2 * p - 1, 16)
  assert rel(params['fusion']) == (2 * p - 1, 64)
  assert 'distance_embedding' not in params['fusion']['layer_11']['crossattention']
  assert 'distance_embedding' not in glob['bert']['layer_7']['attention']
  assert set(params['fusion']) == {f'layer_{i}' for i in range(12)}


def test_presets_configure_the_cnn_chunking():
  assert dualtrack.DualTrack(**dualtrack.TUS_REC_2024).cnn_chunking is None
  model = dualtrack.DualTrack(**dualtrack.TUS_REC_2025)
  assert (model.cnn_chunking, model.max_subsequence, model.max_positions) == (
      'torch_chunk', 1024, 4096)


def test_global_cnn_size_and_layout():
  model = resnet2d.ImageResNet()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 1)))
  assert _count(variables['params']) == 11_195_319  # the original's
  out = jax.eval_shape(model.apply, variables, jnp.zeros((3, 224, 224, 1)))
  assert out.shape == (3, 14, 14, 512)  # no max-pool: 224 -> 112 -> 14
  with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 224, 224, 1)))


def test_regular_grid_indices():
  np.testing.assert_array_equal(dualtrack.regular_grid_indices(1), [0])
  np.testing.assert_array_equal(dualtrack.regular_grid_indices(16), [0])
  np.testing.assert_array_equal(dualtrack.regular_grid_indices(17), [0, 16])
  idx = dualtrack.regular_grid_indices(600)
  assert len(idx) == 38 and idx[-1] == 592  # M = ceil(N / 16)
  np.testing.assert_array_equal(dualtrack.regular_grid_indices(10, 4), [0, 4, 8])


# ---------------------------------------------------------------- the tiny assembled model


@pytest.fixture(scope='module')
def tiny_model():
  model = dualtrack.DualTrack(**TINY)
  variables = _random_variables(model, jnp.zeros((2, N, 32, 32)), jnp.zeros((2, N, 32, 32)))
  return model, variables, jax.jit(model.apply)


def test_forward_shapes_and_gathered_global_input(tiny_model):
  model, variables, apply = tiny_model
  local, glob = _frames(0, 2, N, 32, 32), _frames(1, 2, N, 32, 32)
  out = apply(variables, local, glob)
  assert out.shape == (2, N - 1, 6) and out.dtype == jnp.float32
  # Handing over only the frames at the grid indices gives the same result.
  gathered = apply(variables, local[..., None], glob[:, dualtrack.regular_grid_indices(N, 4)])
  np.testing.assert_allclose(gathered, out, rtol=1e-6, atol=1e-6)


def test_model_is_not_causal(tiny_model):
  model, variables, apply = tiny_model
  local, glob = _frames(2, 2, N, 32, 32), _frames(3, 2, N, 32, 32)
  base = apply(variables, local, glob)
  later = apply(variables, local.at[:, -1].set(_frames(4, 2, 32, 32)), glob)
  assert np.abs(np.asarray(later - base))[:, 0].max() > 1e-4  # the last frame moves output 0


def test_bad_inputs_are_refused_before_computation(tiny_model):
  model, variables, _ = tiny_model
  shape = lambda local, glob: jax.eval_shape(
      functools.partial(model.apply, variables), jnp.zeros(local), jnp.zeros(glob))
  with pytest.raises(ValueError, match='DualTrack: 41 frames > 40 positions'):
    shape((1, 41, 32, 32), (1, 41, 32, 32))
  with pytest.raises(ValueError, match='all 10 frames or the 3 frames'):
    shape((1, N, 32, 32), (1, 4, 32, 32))
  with pytest.raises(ValueError, match='batch 2, local_images 1'):
    shape((1, N, 32, 32), (2, N, 32, 32))
  with pytest.raises(ValueError, match='at least 2 frames'):
    shape((1, 1, 32, 32), (1, 1, 32, 32))
  with pytest.raises(ValueError, match='local_images must be float'):
    model.apply(variables, jnp.zeros((1, N, 32, 32), jnp.uint8), jnp.zeros((1, N, 32, 32)))


@pytest.mark.slow
def test_training_mode_freezes_the_local_cnn_and_trains_the_rest(tiny_model):
  model, variables, _ = tiny_model
  local, glob = _frames(5, 2, N, 32, 32), _frames(6, 2, N, 32, 32)

  @jax.jit
  def train(variables, seed):
    return model.apply(variables, local, glob, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(seed)})

  (out0, state), (out1, _) = train(variables, 0), train(variables, 1)
  assert np.abs(np.asarray(out0 - out1)).max() > 1e-4  # dropout in the BERTs
  old, new = variables['batch_stats'], state['batch_stats']
  # FrozenModuleWrapper: the local CNN keeps its running statistics even in training ...
  jax.tree.map(np.testing.assert_array_equal, new['local_encoder'], old['local_encoder'])
  # ... while the global CNN (not frozen in the released recipe) updates them.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new['global_encoder'],
                         old['global_encoder'])
  assert all(jax.tree.leaves(changed))


def test_bfloat16_model_keeps_float32_params(tiny_model):
  model, variables, apply = tiny_model
  bf16 = dualtrack.DualTrack(**TINY, dtype=jnp.bfloat16)
  local, glob = _frames(7, 1, N, 32, 32), _frames(8, 1, N, 32, 32)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), local, glob)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(functools.partial(bf16.apply, variables), local, glob)
  assert out.shape == (1, N - 1, 6) and out.dtype == jnp.float32  # the head runs in float32


# ---------------------------------------------------------------- local encoder


STAGE2 = dualtrack.LocalEncoder(stage=2, frozen='cnn', **TINY_LOCAL)
SWEEP = 24  # frames; with max_subsequence 16, torch.chunk cuts it into 12 + 12


@pytest.fixture(scope='module')
def stage2():
  """Stage-2 variables and the per-frame ViT features of a 24-frame sweep in one CNN pass."""
  variables = _random_variables(STAGE2, jnp.zeros((1, SWEEP, 32, 32)), seed=1)
  sweep = _frames(9, 1, SWEEP, 32, 32)
  return variables, sweep, jax.jit(STAGE2.apply)(variables, sweep)


def test_stage_trees_match_the_original_stages():
  x = jnp.zeros((1, 4, 32, 32))
  tree = lambda module: jax.eval_shape(module.init, jax.random.key(0), x)['params']
  stage1 = tree(local_encoder.LocalEncoderStage1(
      CNN['cnn_widths'], CNN['cnn_stem_width'], resnet3d.SMALL_WINDOW))
  model3 = dualtrack.LocalEncoder(stage=3, **TINY_LOCAL)
  stage2, stage3 = tree(STAGE2), tree(model3)
  assert set(stage2) == {'cnn', 'vit', 'vit_fc'}
  assert set(stage3) == {'cnn', 'vit', 'vit_fc', 'temporal', 'temporal_fc'}
  # Stage 2 starts from the stage-1 CNN, stage 3 from the whole stage-2 tree.
  assert _shapes(stage2['cnn']) == _shapes(stage1['backbone'])
  assert _shapes({k: stage3[k] for k in stage2}) == _shapes(stage2)
  variables = jax.eval_shape(model3.init, jax.random.key(0), x)
  assert jax.eval_shape(functools.partial(model3.apply, head=True), variables, x).shape == (
      1, 3, 6)


def test_stage2_head_and_features(stage2):
  variables, sweep, features = stage2
  assert features.shape == (1, SWEEP, 8)
  poses = STAGE2.apply(variables, sweep[:, :4], head=True)
  assert poses.shape == (1, 3, 6)


def test_exact_tiling_equals_one_pass(stage2):
  variables, sweep, features = stage2
  tiled = dualtrack.LocalEncoder(stage=2, frozen='cnn', cnn_chunking='exact_tiling',
                                 max_subsequence=6, **TINY_LOCAL)
  # Windows of 6 + 2 * 5 frames; under jit they run in a lax.map.
  np.testing.assert_allclose(jax.jit(tiled.apply)(variables, sweep), features, rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match='eval mode'):
    dualtrack.LocalEncoder(stage=2, frozen='none', cnn_chunking='exact_tiling',
                           max_subsequence=6, **TINY_LOCAL).apply(
                               variables, sweep, train=True, mutable=['batch_stats'])


def test_torch_chunk_runs_chunks_independently(stage2):
  variables, sweep, features = stage2
  chunked = dualtrack.LocalEncoder(stage=2, frozen='cnn', cnn_chunking='torch_chunk',
                                   max_subsequence=16, **TINY_LOCAL)
  out = np.asarray(jax.jit(chunked.apply)(variables, sweep))
  # torch.chunk(x, 24 // 16 + 1): two chunks of 12 frames, each run as a sweep of its own.
  halves = jax.jit(STAGE2.apply)(variables, jnp.concatenate([sweep[:, :12], sweep[:, 12:]]))
  np.testing.assert_allclose(out, np.concatenate([halves[:1], halves[1:]], axis=1), rtol=1e-5,
                             atol=1e-5)
  # Frames more than the CNN's radius (5) from the chunk border agree with one pass; those
  # next to it saw zero padding instead of their neighbours.
  error = np.abs(out - np.asarray(features)).max(axis=(0, 2))
  assert error[:7].max() < 1e-5 and error[17:].max() < 1e-5
  assert error[11] > 1e-3 and error[12] > 1e-3


def test_frozen_cnn_keeps_eval_mode_and_gets_no_gradient(stage2):
  variables, sweep, _ = stage2
  sweep = sweep[:, :6]
  train = lambda module: jax.jit(functools.partial(module.apply, train=True,
                                                   mutable=['batch_stats']))
  frozen_out, frozen_state = train(STAGE2)(variables, sweep)
  jax.tree.map(np.testing.assert_array_equal, frozen_state['batch_stats'],
               variables['batch_stats'])
  np.testing.assert_allclose(frozen_out, jax.jit(STAGE2.apply)(variables, sweep), rtol=1e-6,
                             atol=1e-6)
  trainable = dualtrack.LocalEncoder(stage=2, frozen='none', **TINY_LOCAL)
  out, state = train(trainable)(variables, sweep)
  assert np.abs(np.asarray(out - frozen_out)).max() > 1e-4  # batch statistics
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))

  def loss(params):
    return jnp.sum(STAGE2.apply({**variables, 'params': params}, sweep, head=True) ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads['cnn']))
  assert np.abs(np.asarray(grads['vit']['layer_0']['attention']['query']['kernel'])).max() > 0


def test_local_encoder_configuration_errors():
  x = jnp.zeros((1, 4, 32, 32))
  init = lambda **kw: jax.eval_shape(
      dualtrack.LocalEncoder(**{**TINY_LOCAL, **kw}).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='stage must be 2 or 3'):
    init(stage=1)
  with pytest.raises(ValueError, match='frozen must be one of'):
    init(frozen='vit')
  with pytest.raises(ValueError, match='cnn_chunking must be one of'):
    init(cnn_chunking='chunk', max_subsequence=4)
  with pytest.raises(ValueError, match='max_subsequence is needed by'):
    init(cnn_chunking='torch_chunk')
  with pytest.raises(ValueError, match='LocalEncoder: 4 frames > 3 positions'):
    init(max_positions=3)
  with pytest.raises(ValueError, match=r'\(B, 2, 2, C\)'):
    jax.eval_shape(dualtrack.LocalEncoder(**TINY_LOCAL).init, jax.random.key(0),
                   jnp.zeros((1, 4, 48, 48)))


# ---------------------------------------------------------------- global encoder


def test_global_encoder_indices_and_head():
  model = dualtrack.GlobalEncoder(**CNN, hidden=16, num_layers=1, num_heads=2, max_positions=40)
  images = _frames(10, 2, 3, 32, 32)
  variables = _random_variables(model, images, np.arange(3))
  apply = jax.jit(model.apply)
  grid, other = np.array([0, 4, 8]), np.array([1, 20, 39])
  shared = [apply(variables, images, idx) for idx in (grid, other)]
  per_item = apply(variables, images, np.stack([grid, other]))
  assert per_item.shape == (2, 3, 16)
  np.testing.assert_allclose(per_item[0], shared[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_item[1], shared[1][1], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(shared[0] - shared[1])).max() > 1e-3  # absolute frame positions
  head = jax.eval_shape(functools.partial(model.apply, variables, head=True), images, grid)
  assert head.shape == (2, 2, 6)  # relative transforms of consecutive sampled frames
  with pytest.raises(ValueError, match='frame index 40 is outside the 40 rows of pos_emb'):
    model.apply(variables, images, np.array([0, 16, 40]))
  with pytest.raises(ValueError, match=r'indices must be \(3,\) or \(2, 3\)'):
    model.apply(variables, images, np.arange(4))
