"""SONICHU model: task table, parameter count, shapes, soft-argmax, flip TTA, preprocessing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sonichu_jax import preprocess as pp
from sonichu_jax import tasks
from sonichu_jax.models import sonichu
from sonichu_jax.models.heads import soft_argmax
from ultrasound_common import activations

# Reduced model for everything that runs: 64x64 inputs, 4x4 tokens, 16x16 heatmaps.
TINY = dict(tasks=('FUGC', 'HC'), embed_dim=32, depth=2, num_heads=2, head_filters=16)


def _random_variables(model, image_size=(64, 64), seed=0):
  """Seeded NumPy weights for `model` (no XLA compile of the random initialisers, which is slow).

  Kernels ~ N(0, 1 / fan-in), the heads' final layers 10 times that so that heatmaps are peaked
  (ViTPose's N(0, 0.001) head init puts every keypoint at the centre, which would make the TTA
  tests vacuous); norm scales near 1; BatchNorm variances in [0.5, 1.5].
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [p.key for p in path]
    shape = leaf.shape
    if names[-1] == 'kernel':
      # A stride-2 4x4 transposed conv sums 2x2 taps per output: fan-in is in-channels * 4.
      fan_in = shape[-1] * 4 if names[-2].startswith('deconv') else np.prod(shape[:-1])
      gain = 10.0 if names[-2] == 'final_layer' else 1.0
      return gain * rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
    if names[-1] == 'var':
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if names[-1] == 'scale':
      return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return 0.1 * rng.standard_normal(shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, sonichu.abstract_variables(model, image_size))


@pytest.fixture(scope='module')
def tiny():
  """A tiny model, random variables and its jitted apply (task and tta static)."""
  model = sonichu.SonichuModel(**TINY)
  return model, _random_variables(model), jax.jit(model.apply, static_argnames=('task', 'tta'))


def _images(seed, shape=(2, 64, 64, 3)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_task_table_matches_the_model_card():
  assert tasks.TASK_NAMES == ('AOP', 'FUGC', 'FA', 'HC', 'IVC', 'PLAX', 'PSAX', 'A4C',
                              'fetal_femur')
  assert [t.num_keypoints for t in tasks.TASKS] == [4, 2, 4, 4, 2, 22, 4, 16, 2]
  for t in tasks.TASKS:
    flat = [i for pair in t.flip_pairs for i in pair]
    assert len(set(flat)) == len(flat) and all(0 <= i < t.num_keypoints for i in flat), t.name
    assert t.measurement in tasks.MEASUREMENT_KINDS, t.name
    perm = t.flip_permutation()
    assert [perm[i] for i in perm] == list(range(t.num_keypoints)), t.name  # An involution.
    if t.measurement in ('ellipse', 'angle'):
      assert t.num_keypoints == 4, t.name
    if t.measurement == 'pair_lengths':
      assert t.num_keypoints % 2 == 0, t.name
  assert tasks.get_task('HC').flip_permutation() == (1, 0, 3, 2)
  assert tasks.get_task('fetal_femur').flip_permutation() == (0, 1)


def test_unknown_task_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match=r"Unknown SONICHU task 'hc'; valid tasks: AOP, FUGC, .*"
                                       r'fetal_femur'):
    tasks.get_task('hc')
  model, variables, _ = tiny
  with pytest.raises(ValueError, match="Unknown SONICHU task 'femur'"):
    model.apply(variables, _images(0), 'femur')
  with pytest.raises(ValueError,
                     match="task 'PLAX' has no head in this model; its tasks are FUGC, HC"):
    model.apply(variables, _images(0), 'PLAX')


def test_parameter_count_of_sonichu_124m():
  variables = sonichu.abstract_variables(sonichu.SonichuModel())
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  params = variables['params']
  # Patch conv 3*16*16*768 + 768, stored 256x768 position table, 12 blocks of 7,087,872, final LN.
  assert count(params['backbone']) == 590_592 + 196_608 + 12 * 7_087_872 + 1_536 == 85_843_200
  for t in tasks.TASKS:
    # Deconvs 768*256*16 and 256*256*16, two BNs of 2*256, 1x1 conv 256*K + K.
    assert count(params[f'heads_{t.name}']) == 4_195_328 + 257 * t.num_keypoints, t.name
  assert count(params) == 85_843_200 + 9 * 4_195_328 + 257 * 60 == 123_616_572
  assert count(variables['batch_stats']) == 9 * 2 * 2 * 256
  print(f'SONICHU-124M: {count(params):,} parameters (backbone {count(params["backbone"]):,})')


def test_full_size_shapes():
  model = sonichu.SonichuModel()
  variables = sonichu.abstract_variables(model)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x)),
                          variables, images)
  assert tokens.shape == (2, 16, 16, 768)
  heatmaps = jax.eval_shape(lambda v, x: model.apply(v, x, 'PLAX', method=model.heatmaps),
                            variables, images)
  assert heatmaps.shape == (2, 64, 64, 22)
  coords = jax.eval_shape(lambda v, x: model.apply(v, x, 'A4C', tta=True), variables, images)
  assert coords.shape == (2, 16, 2) and coords.dtype == jnp.float32


def test_soft_argmax_pixel_centre_convention():
  h = np.zeros((2, 64, 64, 3), np.float32)
  h[0, 5, 40, 0] = h[0, 63, 0, 1] = h[1, 0, 63, 2] = 1.0
  coords = np.asarray(soft_argmax(jnp.asarray(h), temperature=1e-3))
  np.testing.assert_allclose(coords[0, 0], [40.5 / 64, 5.5 / 64], atol=1e-6)
  np.testing.assert_allclose(coords[0, 1], [0.5 / 64, 63.5 / 64], atol=1e-6)
  np.testing.assert_allclose(coords[1, 2], [63.5 / 64, 0.5 / 64], atol=1e-6)
  np.testing.assert_allclose(coords[1, 0], [0.5, 0.5], atol=1e-6)  # Flat heatmap: the centre.
  # A high temperature flattens any heatmap towards the centre.
  np.testing.assert_allclose(soft_argmax(jnp.asarray(h), 1e6), 0.5, atol=1e-6)
  # Mirroring the heatmap mirrors x exactly (this is what makes flip TTA unbiased).
  r = jax.random.normal(jax.random.key(1), (2, 16, 12, 4)) * 3
  direct, mirrored = soft_argmax(r), soft_argmax(r[:, :, ::-1])
  np.testing.assert_allclose(mirrored[..., 0], 1 - direct[..., 0], atol=1e-6)
  np.testing.assert_allclose(mirrored[..., 1], direct[..., 1], atol=1e-6)


def test_predictions_shapes_range_and_jit(tiny):
  model, variables, apply = tiny
  images = _images(2)
  for task, k in (('FUGC', 2), ('HC', 4)):
    coords = apply(variables, images, task=task)
    assert coords.shape == (2, k, 2)
    assert np.all((coords > 0) & (coords < 1))
  heatmaps = jax.eval_shape(lambda x: model.apply(variables, x, 'HC', method=model.heatmaps),
                            images)
  assert heatmaps.shape == (2, 16, 16, 4)
  # Not flat: the tiny model's keypoints spread (else the TTA test below would be vacuous).
  assert np.ptp(np.asarray(apply(variables, images, task='HC'))) > 0.1


def test_flip_tta_on_a_symmetric_image(tiny):
  _, variables, apply = tiny
  half = _images(3, (2, 64, 32, 3))
  image = jnp.concatenate([half, half[:, :, ::-1]], axis=2)  # Mirror-symmetric.
  plain = np.asarray(apply(variables, image, task='HC'))
  tta = np.asarray(apply(variables, image, task='HC', tta=True))
  # The mirrored pass sees the same image, so TTA averages the prediction with its mirror, whose
  # pairs (0, 1) and (2, 3) are swapped and x reflected.
  expected = 0.5 * (plain + np.stack([1 - plain[..., 0], plain[..., 1]], -1)[:, [1, 0, 3, 2]])
  np.testing.assert_allclose(tta, expected, atol=1e-5)
  np.testing.assert_allclose(tta[:, 0, 0] + tta[:, 1, 0], 1.0, atol=1e-5)
  np.testing.assert_allclose(tta[:, 0, 1], tta[:, 1, 1], atol=1e-5)
  # TTA output is itself symmetric: mirroring it with the pair swap gives it back.
  np.testing.assert_allclose(sonichu.unflip_keypoints(tta, tasks.get_task('HC')), tta, atol=1e-5)
  # Without flip pairs, a symmetric image puts every keypoint on the mirror axis.
  tta_fugc = np.asarray(apply(variables, image, task='FUGC', tta=True))
  np.testing.assert_allclose(tta_fugc[..., 0], 0.5, atol=1e-5)
  np.testing.assert_allclose(tta_fugc[..., 1], apply(variables, image, task='FUGC')[..., 1],
                             atol=1e-5)


def test_flip_tta_on_any_image_averages_the_mirrored_pass(tiny):
  _, variables, apply = tiny
  images = _images(4)
  plain = np.asarray(apply(variables, images, task='HC'))
  mirrored = np.asarray(apply(variables, images[:, :, ::-1], task='HC'))
  back = np.stack([1 - mirrored[..., 0], mirrored[..., 1]], -1)[:, [1, 0, 3, 2]]
  np.testing.assert_allclose(apply(variables, images, task='HC', tta=True), 0.5 * (plain + back),
                             atol=1e-5)


def test_training_mode_updates_only_the_task_heads_statistics(tiny):
  model, variables, _ = tiny
  train = jax.jit(lambda v, x: model.apply(v, x, 'HC', train=True, mutable=['batch_stats']))
  coords, updates = train(variables, _images(5))
  assert coords.shape == (2, 4, 2)
  new, old = updates['batch_stats'], variables['batch_stats']
  assert not np.allclose(new['heads_HC']['deconv_layers_1']['mean'],
                         old['heads_HC']['deconv_layers_1']['mean'])
  jax.tree.map(np.testing.assert_array_equal, new['heads_FUGC'], old['heads_FUGC'])
  with pytest.raises(ValueError, match='flip TTA is for inference'):
    model.apply(variables, _images(5), 'HC', train=True, tta=True, mutable=['batch_stats'])


def test_drop_path_only_in_training(tiny):
  model, variables, _ = tiny
  model = model.clone(drop_path_rate=0.5)
  images = _images(6)

  @functools.partial(jax.jit, static_argnums=1)
  def run(seed, train):
    return model.apply(variables, images, 'FUGC', method=model.heatmaps, train=train,
                       mutable=['batch_stats'], rngs={'dropout': jax.random.key(seed)})[0]

  assert not np.allclose(run(1, True), run(2, True))
  np.testing.assert_array_equal(run(1, True), run(1, True))
  np.testing.assert_array_equal(run(1, False), run(2, False))


def test_wrong_input_size_for_the_position_table(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError,
                     match=r'pos_embed has shape \(1, 16, 32\), but a 96x64 input needs'):
    model.apply(variables, _images(0, (1, 96, 64, 3)), 'HC')


# ----------------------------------------------------------------------------------------------
# Preprocessing.

def test_preprocess_grayscale_is_replicated_and_rgb_kept():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (30, 50), dtype=np.uint8)
  out, hw = pp.preprocess(gray)
  assert out.shape == (256, 256, 3) and out.dtype == np.float32 and hw == (30, 50)
  unnormalised = out * pp.IMAGENET_STD + pp.IMAGENET_MEAN
  np.testing.assert_allclose(unnormalised[..., 0], unnormalised[..., 1], atol=1e-6)
  np.testing.assert_allclose(unnormalised[..., 0], unnormalised[..., 2], atol=1e-6)
  np.testing.assert_array_equal(pp.preprocess(gray[..., None])[0], out)
  np.testing.assert_allclose(pp.preprocess(gray.astype(np.float64) / 255)[0], out, atol=1e-5)
  rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  rgb_out = pp.preprocess(rgb)[0] * pp.IMAGENET_STD + pp.IMAGENET_MEAN
  assert not np.allclose(rgb_out[..., 0], rgb_out[..., 1])
  # A constant image stays constant through the resize: exactly the normalised value.
  const = pp.preprocess(np.full((7, 300), 255, np.uint8))[0]
  np.testing.assert_allclose(const, np.broadcast_to((1 - pp.IMAGENET_MEAN) / pp.IMAGENET_STD,
                                                    const.shape), atol=1e-6)


def test_preprocess_matches_torch_bilinear():
  g = np.load('tests/fixtures/sonichu/goldens.npz')
  for name in ('down', 'up'):
    out, _ = pp.preprocess(g[f'preprocess/image_{name}'], size=24)
    np.testing.assert_allclose(out, g[f'preprocess/out_{name}'], atol=2e-5)


def test_keypoints_scale_back_to_original_pixels():
  normalised = np.array([[[0.5, 0.25], [0.0, 1.0], [0.1, 0.9]]])
  pixels = pp.to_pixels(normalised, (300, 400))  # (H, W)
  np.testing.assert_allclose(pixels, [[[200, 75], [0, 300], [40, 270]]])
  np.testing.assert_allclose(pp.to_normalised(pixels, (300, 400)), normalised)
  # A bright dot keeps its normalised position through the stretch resize.
  image = np.zeros((120, 480), np.uint8)
  image[30:34, 360:368] = 255  # Centre (x, y) = (364, 32) pixels in corner-origin coordinates.
  out, hw = pp.preprocess(image)
  rows, cols = np.nonzero(out[..., 0] > 0)
  centre = np.array([[(cols.mean() + 0.5) / 256, (rows.mean() + 0.5) / 256]])
  np.testing.assert_allclose(pp.to_pixels(centre, hw), [[364, 32]], atol=1.5)


@pytest.mark.parametrize('image, message', [
    (np.zeros((4, 4, 2), np.uint8), r'expected an \(H, W\), \(H, W, 1\) or \(H, W, 3\) image'),
    (np.zeros((4,), np.uint8), r'got shape \(4,\)'),
    (np.full((4, 4), 2.0), r'must be in \[0, 1\], got range \[2.0, 2.0\]'),
    (np.full((4, 4), np.nan), 'NaN or infinite'),
    (np.zeros((4, 4), np.int16), 'dtype must be uint8 or floating point, got int16'),
])
def test_preprocess_errors(image, message):
  with pytest.raises(ValueError, match=message):
    pp.preprocess(image)


def test_gelu_is_torchs_exact_gelu_with_its_derivative():
  """ultrasound_common.activations.gelu: the erf formula, its closed-form gradient, bf16 kept."""
  x = jnp.linspace(-8.0, 8.0, 2001, dtype=jnp.float32)
  want = jax.nn.gelu(x, approximate=False)
  np.testing.assert_allclose(activations.gelu(x), want, rtol=1e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(activations.gelu))(x)
  want_grad = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  assert activations.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
