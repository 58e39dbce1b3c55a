"""I-JEPA pretraining: masks, predictor, loss parity with the original, EMA, training, init_from.

The goldens in tests/fixtures/ijepa/golden.npz come from the original code (facebookresearch/ijepa
52c1ae9) via scripts/record_ijepa_golden.py; no torch here.
"""
import importlib.util
import os
import types

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from launch import checkpointing
from launch import trainer
from sonichu_jax import convert_ijepa
from sonichu_jax import torch_steps
from sonichu_jax.data import ijepa_masks
from sonichu_jax.data import ijepa_pipeline
from sonichu_jax.experiments import ijepa as ijepa_experiment
from sonichu_jax.experiments import keypoints
from sonichu_jax.models import ijepa
from sonichu_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'fixtures', 'ijepa', 'golden.npz')
MASK_KEYS = ijepa_experiment.MASK_KEYS


def _load(name, arg):
  """configs/sonichu/<name>'s get_config(arg)."""
  spec = importlib.util.spec_from_file_location(
      name.removesuffix('.py'), os.path.join(ROOT, 'configs', 'sonichu', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(GOLDEN))


# Masks ------------------------------------------------------------------------------------------

def test_masks_are_deterministic_with_fixed_shapes():
  config = ijepa_masks.MaskConfig()
  kc, kt = ijepa_masks.token_counts(config)
  assert (kc, kt) == (256, 54)
  a = ijepa_masks.sample_example(np.random.default_rng(3), config)
  b = ijepa_masks.sample_example(np.random.default_rng(3), config)
  for key in MASK_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  assert a['context_index'].shape == (kc,) and a['target_index'].shape == (4, kt)
  assert a['context_valid'].dtype == bool and a['target_valid'].shape == (4, kt)
  context = a['context_index'][a['context_valid']]
  assert len(context) > config.min_keep and np.all(np.diff(context) > 0)
  # The context excludes every target patch.
  targets = np.concatenate([t[v] for t, v in zip(a['target_index'], a['target_valid'])])
  assert not set(context) & set(targets)
  # Per-example mode reaches the last row and column; the padding is index 0, flagged invalid.
  rows = set()
  for seed in range(200):
    m = ijepa_masks.sample_example(np.random.default_rng(seed), config)
    rows |= set(m['target_index'][m['target_valid']] // 16)
    assert np.all(m['context_index'][~m['context_valid']] == 0)
  assert 15 in rows
  with pytest.raises(ValueError, match='sample_batch'):
    ijepa_masks.sample_example(np.random.default_rng(0), ijepa_masks.MaskConfig(official=True))


def test_official_masks_match_the_original_statistics(golden):
  config = ijepa_masks.MaskConfig(official=True)
  rng = np.random.default_rng(0)
  context, target = [], []
  context_freq, target_freq = np.zeros(256), np.zeros(256)
  n = 3000
  for _ in range(n):
    m = ijepa_masks.sample_batch(rng, 1, config)
    c = m['context_index'][0][m['context_valid'][0]]
    context.append(len(c))
    context_freq[c] += 1
    target.append(int(m['target_valid'][0, 0].sum()))
    for t, v in zip(m['target_index'][0], m['target_valid'][0]):
      target_freq[t[v]] += 1
  # Target blocks take the same five sizes, with the same frequencies.
  values, counts = np.unique(golden['stats_b1_target'], return_counts=True)
  ours_values, ours_counts = np.unique(target, return_counts=True)
  np.testing.assert_array_equal(values, ours_values)  # 35, 36, 42, 48, 54.
  np.testing.assert_allclose(ours_counts / n, counts / len(golden['stats_b1_target']), atol=0.03)
  # Kept context tokens: mean and quartiles within 3 tokens of the original's (sd ~18).
  for q in (25, 50, 75):
    assert abs(np.percentile(context, q) - np.percentile(golden['stats_b1_context'], q)) <= 3
  assert abs(np.mean(context) - np.mean(golden['stats_b1_context'])) < 2
  # Neither ever keeps a patch of the last row or column; per-patch frequencies agree.
  for freq in (context_freq / n, target_freq / n, golden['stats_context_freq'],
               golden['stats_target_freq']):
    grid = freq.reshape(16, 16)
    assert grid[-1].max() == 0 and grid[:, -1].max() == 0
  np.testing.assert_allclose(context_freq / n, golden['stats_context_freq'], atol=0.05)
  np.testing.assert_allclose(target_freq / n, golden['stats_target_freq'], atol=0.05)
  # After the truncation to the shortest list of a batch of 16.
  batch16 = [int(ijepa_masks.sample_batch(rng, 16, config)['context_valid'][0].sum())
             for _ in range(400)]
  assert abs(np.mean(batch16) - np.mean(golden['stats_b16_context'])) < 2.5


def test_official_mode_truncates_to_the_shortest_list():
  config = ijepa_masks.MaskConfig(official=True)
  assert ijepa_masks.token_counts(config) == (225, 54)  # The 15x15 context block at most.
  # The same draws without truncation (the original's order: sizes, then image by image).
  rng = np.random.default_rng(7)
  sizes = ijepa_masks._sizes(rng, config)  # pylint: disable=protected-access
  images = [ijepa_masks._image_masks(rng, *sizes, config)  # pylint: disable=protected-access
            for _ in range(8)]
  batch = ijepa_masks.sample_batch(np.random.default_rng(7), 8, config)
  shortest = min(len(c) for c, _ in images)
  assert len({len(c) for c, _ in images}) > 1  # The truncation does something here.
  np.testing.assert_array_equal(batch['context_valid'].sum(1), shortest)
  for i, (context, targets) in enumerate(images):
    np.testing.assert_array_equal(batch['context_index'][i, :shortest], context[:shortest])
    for m, t in enumerate(targets):
      np.testing.assert_array_equal(batch['target_index'][i, m][batch['target_valid'][i, m]], t)


# Model ------------------------------------------------------------------------------------------

def test_predictor_size_and_masked_encoder_equals_the_backbone():
  predictor = ijepa.Predictor()  # ViT-B/16's: width 384, depth 6, 12 heads.
  shapes = jax.eval_shape(
      predictor.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 100, 768), jnp.float32),
      jax.ShapeDtypeStruct((2, 100), jnp.int32), jax.ShapeDtypeStruct((2, 100), bool),
      jax.ShapeDtypeStruct((2, 4, 54), jnp.int32), jax.ShapeDtypeStruct((2, 4, 54), bool))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 11_238_912
  out = jax.eval_shape(lambda v, *a: predictor.apply(v, *a), shapes,
                       jax.ShapeDtypeStruct((2, 100, 768), jnp.float32),
                       jax.ShapeDtypeStruct((2, 100), jnp.int32),
                       jax.ShapeDtypeStruct((2, 100), bool),
                       jax.ShapeDtypeStruct((2, 4, 54), jnp.int32),
                       jax.ShapeDtypeStruct((2, 4, 54), bool))
  assert out.shape == (2, 4, 54, 768)
  kw = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  backbone = vit.VisionTransformer(**kw)
  variables = jax.jit(backbone.init)(jax.random.key(2), images)  # Eager init is slow on CPU.
  encoder = ijepa.MaskedEncoder(**kw)
  assert (jax.tree.structure(jax.eval_shape(encoder.init, jax.random.key(2), images))
          == jax.tree.structure(variables))
  np.testing.assert_array_equal(jax.jit(encoder.apply)(variables, images),
                                jax.jit(backbone.apply)(variables, images).reshape(2, 16, 32))


def _golden_model():
  encoder = ijepa.MaskedEncoder(patch_size=8, embed_dim=32, depth=2, num_heads=4)
  predictor = ijepa.Predictor(grid=(6, 6), embed_dim=32, predictor_dim=16, depth=2, num_heads=4)
  return ijepa.IJepa(encoder, predictor)


def _golden_inputs(golden):
  context = jnp.asarray(golden['masks_enc'][:, 0])
  target = jnp.asarray(golden['masks_pred'])
  return (jnp.asarray(golden['image']), context, jnp.ones(context.shape, bool), target,
          jnp.ones(target.shape, bool))


def _checkpoint(golden):
  return {entry: {k.split('.', 1)[1]: v for k, v in golden.items()
                  if k.startswith(entry + '.')} for entry in convert_ijepa.ENTRIES}


@pytest.fixture(scope='module')
def golden_step(golden):
  model = _golden_model()
  variables = convert_ijepa.from_ijepa(_checkpoint(golden), model, 48)
  inputs = _golden_inputs(golden)
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, t, *a: ijepa.ijepa_loss(model, p, t, *a)[0]))
  return model, variables, inputs, loss_and_grad


def test_one_step_matches_the_original(golden, golden_step):
  model, variables, inputs, loss_and_grad = golden_step
  loss, grads = loss_and_grad(variables['params'], variables['target']['encoder'], *inputs)
  assert abs(float(loss) - float(golden['loss'])) <= 1e-5 * abs(float(golden['loss']))
  # Our gradients in the original's names and layouts (the same export as checkpoints).
  ours = convert_ijepa.to_ijepa({'params': grads, 'target': {'encoder': grads['encoder']}},
                                model.predictor)
  checked = 0
  for key, want in golden.items():
    if not key.startswith('grad.'):
      continue
    entry, name = key.removeprefix('grad.').split('.', 1)
    got = ours[entry]['module.' + name]
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= 1e-5, (key, err)
    checked += 1
  # Every parameter but the two fixed sin-cos tables, which have no .grad in the original (ours
  # is config.frozen; the predictor's is a constant).
  assert checked == len(ours['encoder']) + len(ours['predictor']) - 2 == 59


def test_padding_is_ignored(golden_step):
  _, variables, inputs, loss_and_grad = golden_step
  images, context, context_valid, target, target_valid = inputs
  loss, grads = loss_and_grad(variables['params'], variables['target']['encoder'], *inputs)
  # Padded with other (valid-looking) indices flagged invalid: nothing changes.
  pad_c = jnp.full((3, 5), 7, jnp.int32)
  pad_t = jnp.full((3, 4, 3), 11, jnp.int32)
  padded = (images, jnp.concatenate([context, pad_c], 1),
            jnp.concatenate([context_valid, jnp.zeros((3, 5), bool)], 1),
            jnp.concatenate([target, pad_t], 2),
            jnp.concatenate([target_valid, jnp.zeros((3, 4, 3), bool)], 2))
  loss2, grads2 = jax.jit(jax.value_and_grad(
      lambda p, t, *a: ijepa.ijepa_loss(_golden_model(), p, t, *a)[0]))(
          variables['params'], variables['target']['encoder'], *padded)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoint_layout_round_trip(golden):
  checkpoint = _checkpoint(golden)
  model = _golden_model()
  variables = convert_ijepa.from_ijepa(checkpoint, model, 48)
  back = convert_ijepa.to_ijepa(variables, model.predictor)
  for entry in convert_ijepa.ENTRIES:
    assert set(back[entry]) == {'module.' + k for k in checkpoint[entry]}
    for key, value in checkpoint[entry].items():
      np.testing.assert_array_equal(back[entry]['module.' + key], value)
  broken = dict(checkpoint, predictor=dict(checkpoint['predictor'], extra=np.zeros(2)))
  with pytest.raises(ValueError, match=r'\[predictor\].*unused: extra'):
    convert_ijepa.from_ijepa(broken, model, 48)


# EMA --------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_experiment():
  config = _load('pretrain_ijepa.py', 'sim')
  config.data.synthetic.num_train = 8
  config.data.synthetic.num_val = 2
  config.batch_size = 2
  config.total_steps = 10
  # Smaller than :sim (an 8x8 grid still): this test compiles two steps of its own.
  config.data.image_size = 128
  config.model.update(patch_size=16, embed_dim=32, depth=1, num_heads=2)
  config.predictor.update(dim=16, depth=1, num_heads=2)
  experiment = ijepa_experiment.Experiment(config)
  batch = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
  return experiment, jax.tree.map(jnp.asarray, batch)


def test_momentum_schedule(tiny_experiment):
  experiment, _ = tiny_experiment
  assert experiment.total_steps == 10
  m = [float(ijepa_experiment.momentum(i, 10, (0.996, 1.0))) for i in range(11)]
  np.testing.assert_allclose(m, 0.996 + np.arange(11) * 0.0004, rtol=1e-7)


def test_ema_follows_the_original_order(tiny_experiment):
  experiment, batch = tiny_experiment
  variables = jax.jit(experiment.init)(jax.random.key(0), batch)  # Eager init is slow on CPU.
  # As the trainer differentiates it: with respect to the params only.
  loss_fn = jax.jit(jax.value_and_grad(
      lambda p, target, batch, rng: experiment.loss_fn({'params': p, 'target': target}, batch,
                                                       rng), has_aux=True))
  ema = (0.996, 1.0)
  params, target = variables['params'], variables['target']
  # The original's loop, with a plain SGD step: forward with T_t, P_{t+1} = P_t - lr g,
  # T_{t+1} = m_t T_t + (1 - m_t) P_{t+1}.
  masks = [batch[k] for k in MASK_KEYS]
  direct = jax.jit(jax.value_and_grad(
      lambda p, t: ijepa.ijepa_loss(experiment.model, p, t, batch['image'], *masks),
      has_aux=True))
  reference = target['encoder']
  for t in range(3):
    (loss, (metrics, updates)), grads = loss_fn(params, target, batch, jax.random.key(t))
    # This step's forward used exactly the original's T_t, and no gradient reached the
    # parameters through the EMA.
    (want, aux), want_grads = direct(params, reference)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics['target_std'], aux['target_std'], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert int(updates['target']['step']) == t + 1
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    m = ema[0] + t * (ema[1] - ema[0]) / 10
    reference = jax.tree.map(lambda a, b: m * a + (1 - m) * b, reference, params['encoder'])
    target = updates['target']
  # The last step's update is pending in the stored state; target_encoder applies it.
  for a, b in zip(jax.tree.leaves(jax.jit(experiment.target_encoder)({'params': params,
                                                                      'target': target})),
                  jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# Frozen teacher (SALT) -------------------------------------------------------------------------

def _tiny_config(**frozen_target):
  """tiny_experiment's config, with `frozen_target` set when given."""
  config = _load('pretrain_ijepa.py', 'sim')
  config.data.synthetic.num_train = 4
  config.data.synthetic.num_val = 2
  config.batch_size = 2
  config.total_steps = 10
  config.data.image_size = 128
  config.model.update(patch_size=16, embed_dim=32, depth=1, num_heads=2)
  config.predictor.update(dim=16, depth=1, num_heads=2)
  config.frozen_target.update(frozen_target)
  return config


@pytest.mark.slow  # Compiles two inits and a train step (about 20 s of CPU).
def test_frozen_target_stays_fixed_while_the_context_encoder_learns(tmp_path):
  from launch import config_utils  # pylint: disable=g-import-not-at-top
  from launch import optim  # pylint: disable=g-import-not-at-top
  # A teacher run: an I-JEPA run whose target encoder differs from its context encoder.
  config = _tiny_config()
  experiment = ijepa_experiment.Experiment(config)
  batch = jax.tree.map(jnp.asarray, next(iter(
      experiment.train_dataset(seed=0, shard_index=0, shard_count=1))))
  init = jax.jit(experiment.init)
  teacher = init(jax.random.key(1), batch)
  teacher['target']['encoder'] = jax.tree.map(lambda x: x + 0.1, teacher['target']['encoder'])
  run = str(tmp_path / 'teacher')
  checkpointing.save_variables(os.path.join(run, checkpointing.LATEST_DIR), 7, teacher,
                               config_utils.to_json_dict(config))

  salt = ijepa_experiment.Experiment(_tiny_config(workdir=run))
  variables = jax.jit(salt.init)(jax.random.key(0), batch)
  flat = flax.traverse_util.flatten_dict
  want = flat(teacher['target']['encoder'])
  for path, value in flat(variables['target']['encoder']).items():
    np.testing.assert_array_equal(value, want[path])
  tx, schedule = optim.make_optimizer(config.optim, total_steps=10, warmup_steps=2)
  state = {'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key(0), 'variables': variables,
           'opt_state': tx.init(variables['params'])}
  step = jax.jit(trainer.make_train_step(salt, tx, schedule))
  for _ in range(2):
    state, metrics = step(state, batch)
  assert 'ema_momentum' not in metrics and np.isfinite(metrics['loss'])
  # Never updated (no EMA), while the context encoder moved.
  for path, value in flat(salt.target_encoder(state['variables'])).items():
    np.testing.assert_array_equal(value, want[path])
  assert int(state['variables']['target']['step']) == 2
  moved = flat(state['variables']['params']['encoder'])
  assert any(np.any(np.asarray(v) != flat(variables['params']['encoder'])[k])
             for k, v in moved.items())

  # A keypoint run's backbone serves too; another architecture or a missing run is an error.
  encoder = jax.tree.map(np.asarray, teacher['params']['encoder'])
  run = str(tmp_path / 'keypoints')
  checkpointing.save_variables(os.path.join(run, checkpointing.BEST_DIR), 3,
                               {'params': {'backbone': encoder, 'heads_HC': {'b': np.ones(2)}}},
                               {'experiment': 'sonichu_jax.experiments.keypoints'})
  def read(path, template):
    return ijepa_experiment.read_encoder(path, 'best', template,
                                         key=f'config.frozen_target.workdir={path!r}')

  got = read(run, encoder)
  np.testing.assert_array_equal(got['norm']['scale'], encoder['norm']['scale'])
  wide = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,)), encoder)
  with pytest.raises(ValueError, match=r"config.frozen_target.workdir='.*keypoints'.*"
                                       'another architecture'):
    read(run, wide)
  with pytest.raises(FileNotFoundError, match=r"config.frozen_target.workdir='.*nowhere'"):
    read(str(tmp_path / 'nowhere'), encoder)


# Training and init_from -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sim_run(tmp_path_factory):
  config = _load('pretrain_ijepa.py', 'sim')
  config.data.synthetic.num_train = 32
  config.data.synthetic.num_val = 4
  config.total_steps = 6
  config.warmup_epochs = 0.0
  config.optim.lr = 1e-3
  config.log_every_steps = 3
  config.checkpoint_every_steps = 6
  workdir = str(tmp_path_factory.mktemp('ijepa_sim'))
  metrics = trainer.train_and_evaluate(config, workdir)
  return config, workdir, metrics


@pytest.mark.slow  # Compiles the train step (about a minute on a busy 2-core CPU).
def test_sim_run_trains_and_evaluates(sim_run):
  config, workdir, metrics = sim_run
  assert set(metrics) == {'loss', 'target_std', 'zero_prediction_loss'}
  assert np.isfinite(metrics['loss']) and metrics['target_std'] > 0.05
  variables, _ = checkpointing.restore_variables(
      os.path.join(workdir, checkpointing.LATEST_DIR), 6,
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert int(variables['target']['step']) == 6
  # The frozen position table did not move; the trained encoder and its EMA differ.
  fresh = ijepa_experiment.Experiment(config, load_data=False)
  table = vit.sincos_pos_embed((8, 8), 64)
  np.testing.assert_array_equal(variables['params']['encoder']['pos_embed'], table)
  assert not np.allclose(variables['params']['encoder']['blocks_0']['attn']['qkv']['kernel'],
                         variables['target']['encoder']['blocks_0']['attn']['qkv']['kernel'])
  batch = ijepa_pipeline.eval_batch(ijepa_pipeline.synthetic_pool(1, seed=0, split='val'),
                                    image_size=256, mask_config=fresh.masks)
  figure = ijepa_experiment.mask_figure(batch, 0, fresh.masks.grid)
  assert figure.shape == (256, 256, 3) and figure.dtype == np.uint8


@pytest.mark.slow  # Needs the run above.
def test_encoders_initialise_the_keypoint_model(sim_run):
  _, workdir, _ = sim_run
  config = _load('keypoints_from_ijepa.py', 'sim')
  config.init_from.ijepa.workdir = workdir
  model = keypoints.build_model(config)
  template = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, 256, 256, 3)),
                           method=type(model).all_tasks), jax.random.key(0))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(template))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = checkpointing.init_from_config(config.init_from, fresh, sharding)
  source, _ = checkpointing.restore_variables(
      os.path.join(workdir, checkpointing.LATEST_DIR), 6, sharding)
  flat = flax.traverse_util.flatten_dict
  # The target (EMA) encoder, not the context encoder: they differ after training.
  assert any(np.any(np.asarray(value) != flat(source['params']['encoder'])[path])
             for path, value in flat(source['target']['encoder']).items())
  for path, value in flat(source['target']['encoder']).items():
    np.testing.assert_array_equal(flat(loaded['params']['backbone'])[path], value)


def test_folder_images_feed_the_pipeline(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i, name in enumerate(['train/a/1.png', 'train/b/2.JPG', 'train/3.png', 'val/4.png']):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40 + i, 50), np.uint8)).save(
        path, format='JPEG' if name.endswith('JPG') else 'PNG')
  (tmp_path / 'train' / 'labels.csv').write_text('not an image\n')
  images = ijepa_pipeline.folder_images(str(tmp_path), 'train')
  assert [os.path.relpath(p, tmp_path) for p in images.paths] == [
      'train/3.png', 'train/a/1.png', 'train/b/2.JPG']
  assert images[1].shape == (40, 50) and images[1].dtype == np.uint8
  config = ijepa_masks.MaskConfig(grid=(4, 4))
  batch = next(iter(ijepa_pipeline.train_batches(images, batch_size=2, seed=0, image_size=32,
                                                 mask_config=config)))
  assert batch['image'].shape == (2, 32, 32, 3) and batch['target_index'].shape == (2, 4, 4)
  assert len(ijepa_pipeline.folder_images(str(tmp_path), 'train', limit=2)) == 2
  with pytest.raises(ValueError, match=r"dataset=.*no test/ folder"):
    ijepa_pipeline.folder_images(str(tmp_path), 'test')


def test_pipeline_official_masks_per_batch_and_shards():
  images = ijepa_pipeline.synthetic_pool(4, seed=0, split='train', image_hw=(48, 48))
  config = ijepa_masks.MaskConfig(grid=(8, 8), official=True, min_keep=4)
  kw = dict(batch_size=4, seed=1, image_size=64, mask_config=config)
  whole = next(iter(ijepa_pipeline.train_batches(images, **kw)))
  assert len(set(whole['context_valid'].sum(1))) == 1  # Truncated to the batch's shortest.
  assert whole['target_index'].shape == (4, 4, ijepa_masks.token_counts(config)[1])
  # Two processes read the images of one (the official masks are drawn per process batch).
  halves = [next(iter(ijepa_pipeline.train_batches(images, shard_index=i, shard_count=2, **kw)))
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), whole['image'])


def test_full_config_builds_sonichu_vit_b16():
  config = _load('pretrain_ijepa.py', None)
  experiment = ijepa_experiment.Experiment(config, load_data=False)
  kc, kt = ijepa_masks.token_counts(experiment.masks)
  assert (kc, kt) == (128, 54)  # The context capped at half the 16x16 grid.
  batch = {'image': jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
           'context_index': jax.ShapeDtypeStruct((2, kc), jnp.int32),
           'context_valid': jax.ShapeDtypeStruct((2, kc), bool),
           'target_index': jax.ShapeDtypeStruct((2, 4, kt), jnp.int32),
           'target_valid': jax.ShapeDtypeStruct((2, 4, kt), bool)}
  shapes = jax.eval_shape(experiment.init, jax.random.key(0), batch)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(shapes['params']['encoder']) == 85_843_200  # SONICHU's backbone.
  assert count(shapes['params']['predictor']) == 11_238_912
  assert count(shapes['target']['encoder']) == 85_843_200
  assert experiment.model.encoder.dtype == jnp.bfloat16


# launch.convert --model=ijepa ------------------------------------------------------------------

def test_launch_convert_round_trips_the_official_layout(tmp_path):
  from launch import convert as convert_cli  # pylint: disable=g-import-not-at-top
  from launch import torch_io  # pylint: disable=g-import-not-at-top
  from sonichu_jax import interface  # pylint: disable=g-import-not-at-top
  source = os.path.join(ROOT, 'tests', 'fixtures', 'sonichu', 'ijepa.pth')
  original = torch_io.load(source)
  run = str(tmp_path / 'run')
  convert_cli.convert_from_torch(source, run, 'ijepa', variant='sim')
  variables, config = checkpointing.restore_variables(
      os.path.join(run, checkpointing.BEST_DIR), 0,
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  # The architecture comes from the file (width 32, 2 blocks, 4x4 grid of 16 px patches).
  assert (config['model']['embed_dim'], config['model']['depth'], config['data']['image_size'],
          config['predictor']['dim'], config['predictor']['depth']) == (32, 2, 64, 16, 1)
  assert int(variables['target']['step']) == 0
  np.testing.assert_array_equal(variables['target']['encoder']['norm']['bias'],
                                original['target_encoder']['module.norm.bias'])
  back = interface.to_torch(variables, config, source=run)
  assert list(back) == list(original)
  for entry in convert_ijepa.ENTRIES:
    assert list(back[entry]) == list(original[entry]), entry  # Same names, same order.
    for key, value in original[entry].items():
      assert back[entry][key].dtype == value.dtype
      np.testing.assert_array_equal(back[entry][key], value, err_msg=key)
  # AdamW's four groups of the original's init_opt: decayed encoder and predictor weights, then
  # their biases and 1-D tensors; every tensor counted once.
  groups = back['opt']['param_groups']
  assert [len(g['params']) for g in groups] == [10, 8, 19, 12]
  assert [g['weight_decay'] for g in groups] == [0.04, 0.04, 0, 0]
  assert (back['epoch'], back['world_size'], back['scaler']) == (0, 1, None)
  # Read back (as launch.convert reads a nested checkpoint): the same variables.
  flat = {f'{entry}.{k}': v for entry in convert_ijepa.ENTRIES for k, v in back[entry].items()}
  again, _ = interface.from_torch('ijepa', flat, ml_collections.ConfigDict(config), source='back',
                                  allow_reinit=None, seed=0)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"back: not an I-JEPA training checkpoint: no \['predictor"):
    interface.from_torch('ijepa', {k: v for k, v in flat.items() if k.startswith('encoder.')},
                         ml_collections.ConfigDict(config), source='back', allow_reinit=None,
                         seed=0)


def test_official_step_benchmark_inputs(tmp_path):
  """launch.benchmark --bench=train --original=IJEPA's masks (cut to the batch's shortest list, as
  the official collator does) and its errors, which come before torch is imported."""
  index = np.array([[[1, 2, 3], [4, 5, 0]], [[6, 7, 8], [9, 0, 0]]])  # (B=2, M=2, K=3)
  valid = index > 0
  lists = torch_steps._index_lists(index, valid, types.SimpleNamespace(from_numpy=np.asarray))
  np.testing.assert_array_equal(lists[0], [[1, 2, 3], [6, 7, 8]])
  np.testing.assert_array_equal(lists[1], [[4], [9]])
  config = _load('pretrain_ijepa.py', 'sim')
  with pytest.raises(ValueError, match=r"--original='/nowhere': not a checkout of "
                                       'facebookresearch/ijepa'):
    torch_steps.ijepa_step(config, {}, original='/nowhere', device='cpu')
  checkout = tmp_path / 'ijepa'
  (checkout / 'src' / 'models').mkdir(parents=True)
  (checkout / 'src' / 'models' / 'vision_transformer.py').write_text('')
  config.frozen_target.workdir = 'runs/other'
  with pytest.raises(ValueError, match='config.frozen_target.workdir'):
    torch_steps.ijepa_step(config, {}, original=str(checkout), device='cpu')
