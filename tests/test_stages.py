"""DualTrack stages 2, 3, global, fusion and the 2025 finetuning: init_from, frozen parts, cache.

The chain trains every small (`:sim`) variant for a step or two on a tiny simulated dataset,
each initialised from the previous stage's checkpoint, and checks what each stage must keep.
"""
import os

import jax
import numpy as np
import pytest

from dualtrack_jax import feature_cache
from dualtrack_jax.experiments import common
from launch import checkpointing
from launch import config_utils
from launch import sharding
from launch import trainer

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'dualtrack')


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
  # Whole-sweep stages train with batch 1, as the original: one device of the 8 simulated ones.
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: make_mesh(jax.devices()[:1]))


def _config(name, cache_dir, **init_from):
  config = config_utils.load_config_file(os.path.join(CONFIGS, name))
  config.data.synthetic.update(num_train=2, num_val=1, cache_dir=str(cache_dir))
  config.data.synthetic.simulator = dict(num_frames=(40, 40), height=48, width=64)
  config.data.crop = (32, 32)
  if 'window' in config.data:
    config.data.window = 8
  model = config.model
  for key, value in dict(widths=(4, 4, 8, 8), stem_width=4, cnn_widths=(4, 4, 8, 8),
                         cnn_stem_width=4, local_cnn_widths=(4, 4, 8, 8), local_cnn_stem_width=4,
                         global_cnn_widths=(4, 4, 8, 8), global_cnn_stem_width=4,
                         vit_feature_map_size=2, vit_layers=1, num_layers=1,
                         global_layers=1).items():
    if key in model:
      model[key] = value
  if 'num_samples' in config.data:
    config.data.num_samples = 8
  config.batch_size = 1 if config.batch_size == 1 else 2
  config.total_steps = 1
  config.eval_tile = 64  # Sweeps of 40 frames: one window, one program less to compile.
  config.num_workers = 0
  if 'feature_cache' in config:
    config.feature_cache.directory = str(cache_dir / 'features')
  for source, workdir in init_from.items():
    config.init_from[source].workdir = workdir
  return config


def _variables(workdir):
  directory, step = checkpointing.find_checkpoint(workdir, 'latest')
  return checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))[0]


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_all_small_stages_chain_end_to_end(tmp_path):
  cache = tmp_path / 'cache'
  run = lambda name: str(tmp_path / name)
  stages = [
      ('local_stage1.py:sim', 'l1', {}),
      ('local_stage2.py:sim', 'l2', dict(stage1=run('l1'))),
      ('local_stage3.py:sim', 'l3', dict(stage2=run('l2'))),
      ('global_encoder.py:sim', 'g', {}),
      ('fusion.py:sim', 'f', dict(global_encoder=run('g'), local=run('l3'))),
      ('finetune_2025.py:stg0:sim', 'stg0', dict(tus_rec_2024=run('f'))),
      ('finetune_2025.py:stg1:sim', 'stg1', dict(stg0=run('stg0'))),
      ('finetune_2025.py:stg2:sim', 'stg2', dict(stg1=run('stg1'))),
  ]
  for config_name, workdir, init_from in stages:
    final = trainer.train_and_evaluate(_config(config_name, cache, **init_from), run(workdir))
    for key in (common.GPE, f'baseline/zero_motion/{common.GPE}'):
      assert np.isfinite(final[key]), (config_name, key)

  l1, l2, l3 = _variables(run('l1')), _variables(run('l2')), _variables(run('l3'))
  # Frozen CNN: stage 1's weights and BN statistics through stages 2 and 3 and into fusion.
  for collection in ('params', 'batch_stats'):
    _assert_tree_equal(l2[collection]['cnn'], l1[collection]['backbone'])
    _assert_tree_equal(l3[collection]['cnn'], l1[collection]['backbone'])
  _assert_tree_equal(l3['params']['vit'], l2['params']['vit'])
  f, g = _variables(run('f')), _variables(run('g'))
  _assert_tree_equal(f['params']['local_encoder']['vit'], l2['params']['vit'])
  _assert_tree_equal(f['batch_stats']['local_encoder']['cnn'], l1['batch_stats']['backbone'])
  # Fusion trains the global encoder with BN in training mode (its statistics move).
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       f['batch_stats']['global_encoder'], g['batch_stats'])
  assert all(jax.tree.leaves(moved))
  # stg0: the position tables start afresh (new shapes), everything else is the 2024 model's.
  stg0 = _variables(run('stg0'))
  assert stg0['params']['global_encoder']['pos_emb']['embedding'].shape[0] == 512
  _assert_tree_equal(stg0['params']['local_encoder']['cnn'], f['params']['local_encoder']['cnn'])
  # stg2 "thaws the CNN" but only the ViT trains, as in the original.
  stg1, stg2 = _variables(run('stg1')), _variables(run('stg2'))
  _assert_tree_equal(stg2['params']['local_encoder']['cnn'], stg1['params']['local_encoder']['cnn'])
  assert not np.array_equal(stg2['params']['local_encoder']['vit']['embeddings']['cls_token'],
                            stg1['params']['local_encoder']['vit']['embeddings']['cls_token'])


# init_from -------------------------------------------------------------------------------------

def _tree(**leaves):
  return checkpointing._unflatten({k: np.full(v, float(len(k)), np.float32)
                                   for k, v in leaves.items()})


def test_map_copies_a_subtree_and_keeps_new_parts():
  source = _tree(**{'params/backbone/conv/kernel': (3, 2), 'params/fc/kernel': (2, 6),
                    'batch_stats/backbone/bn/mean': (2,)})
  target = {'params': {'cnn': {'conv': {'kernel': np.zeros((3, 2), np.float32)}},
                       'vit': {'w': np.zeros((4,), np.float32)}},
            'batch_stats': {'cnn': {'bn': {'mean': np.zeros((2,), np.float32)}}}}
  out = checkpointing.map_variables(source, target, [('backbone', 'cnn')])
  np.testing.assert_array_equal(out['params']['cnn']['conv']['kernel'],
                                source['params']['backbone']['conv']['kernel'])
  np.testing.assert_array_equal(out['batch_stats']['cnn']['bn']['mean'],
                                source['batch_stats']['backbone']['bn']['mean'])
  np.testing.assert_array_equal(out['params']['vit']['w'], 0.0)  # Not covered: initial value.


@pytest.mark.parametrize('mapping, reinit, message', [
    ([('head', 'cnn')], (), "no parameters under 'params/head'"),
    ([('', '')], (), (r'params/table/embedding has shape \(4, 2\) but params/table/embedding '
                      r'has \(8, 2\); list it in init_from')),
    ([('', 'cnn')], ('table',), 'maps to params/cnn/table/embedding, which the model does not'),
    ([('', '')], ('nothing',), "reinit path 'nothing' is not in the model"),
])
def test_map_refuses_mismatches_naming_the_path(mapping, reinit, message):
  source = _tree(**{'params/table/embedding': (4, 2), 'params/w': (3,)})
  target = _tree(**{'params/table/embedding': (8, 2), 'params/w': (3,)})
  with pytest.raises(ValueError, match=message):
    checkpointing.map_variables(source, target, mapping, reinit=reinit)


def test_reinit_keeps_the_fresh_init_of_listed_tables_only():
  source = _tree(**{'params/a/table/embedding': (4, 2), 'params/b/table/embedding': (4, 2),
                    'params/w': (3,)})
  target = {'params': {'a': {'table': {'embedding': np.full((8, 2), -1.0, np.float32)}},
                       'b': {'table': {'embedding': np.full((4, 2), -1.0, np.float32)}},
                       'w': np.full((3,), -1.0, np.float32)}}
  out = checkpointing.map_variables(source, target, [('', '')], reinit=('a/table',))
  np.testing.assert_array_equal(out['params']['a']['table']['embedding'], -1.0)
  np.testing.assert_array_equal(out['params']['b']['table']['embedding'],
                                source['params']['b']['table']['embedding'])
  np.testing.assert_array_equal(out['params']['w'], source['params']['w'])


def test_init_from_without_workdir_names_the_key():
  with pytest.raises(config_utils.ConfigError, match=r'config.init_from.stage1.workdir is empty'):
    checkpointing.init_from_config({'stage1': {'workdir': '', 'map': [('', '')]}}, {}, None)


# Configs ---------------------------------------------------------------------------------------

def _load(name):
  return config_utils.load_config_file(os.path.join(CONFIGS, name))


def test_full_configs_keep_the_original_hyper_parameters():
  # lr, weight decay, epochs, warmup epochs, batch, eval every: the original recipes
  # (docs/dualtrack.md, sections "Training recipes" and "TUS-REC 2025 finetuning").
  table = {
      'local_stage2.py': (1e-3, 0.0, 500, 0, 16, 10),
      'local_stage3.py': (1e-4, 0.0, 500, 0, 1, 10),
      'global_encoder.py': (1e-4, 1e-3, 5000, 0, 4, 100),
      'fusion.py': (1e-4, 0.0, 500, 10, 1, 10),
      'finetune_2025.py:stg0': (1e-4, 0.0, 20, 1, 1, 1),
      'finetune_2025.py:stg1': (1e-4, 0.0, 200, 1, 1, 1),
      'finetune_2025.py:stg2': (1e-4, 0.0, 200, 1, 1, 1),
  }
  for name, expected in table.items():
    c = _load(name)
    assert (c.optim.lr, c.optim.weight_decay, c.num_epochs, c.warmup_epochs, c.batch_size,
            c.eval_every_epochs) == expected, name
  stg0, stg2 = _load('finetune_2025.py:stg0'), _load('finetune_2025.py:stg2')
  assert len(stg0.init_from.tus_rec_2024.reinit) == 17
  assert (stg0.model.max_positions, stg0.model.cnn_chunking) == (4096, 'torch_chunk')
  assert tuple(stg2.frozen) == ('local_encoder/cnn/.*',) and stg2.model.local_frozen == 'cnn'
  assert stg2.model.max_subsequence == 512
  assert dict(_load('finetune_2025.py:stg1').data.augment)['subsample_p'] == 0.5


@pytest.mark.parametrize('name', ['local_stage2.py:big', 'finetune_2025.py:stg3',
                                  'finetune_2025.py'])
def test_unknown_variants_are_refused(name):
  with pytest.raises(ValueError, match='unknown'):
    _load(name)


def test_feature_cache_with_augmentation_is_refused():
  from dualtrack_jax.experiments import local_stage3  # pylint: disable=g-import-not-at-top
  config = _load('local_stage3.py')
  config.feature_cache.enabled = True
  with pytest.raises(ValueError, match='no image augmentation can be applied'):
    local_stage3.Experiment(config, load_data=False).features_from_cache()


# Feature cache ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_local(tmp_path_factory):
  """A tiny stage-2 local encoder, its random variables and two simulated sweeps."""
  from dualtrack_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from dualtrack_jax.models import dualtrack  # pylint: disable=g-import-not-at-top
  config = _config('local_stage2.py:sim', tmp_path_factory.mktemp('cache'))
  local = dict(common.module_kwargs(config.model))
  variables = dualtrack.LocalEncoder(**local).init(
      jax.random.key(0), np.zeros((1, 2, 32, 32), np.float32))
  return local, variables, datasets.load_split(config.data, 'train')


@pytest.mark.slow
def test_cached_features_equal_recomputation_are_reused_and_invalidated(tiny_local, tmp_path):
  from dualtrack_jax.data import sweeps  # pylint: disable=g-import-not-at-top
  from dualtrack_jax.models import dualtrack  # pylint: disable=g-import-not-at-top
  local, variables, records = tiny_local
  read = lambda reader: common.center_crops(reader, (32, 32))[0]
  key = feature_cache.cache_key(local, variables, (32, 32))
  cache = feature_cache.FeatureCache(str(tmp_path), key)
  assert feature_cache.fill(cache, records, local, variables, tile=4, read_crops=read) == 2
  assert feature_cache.fill(cache, records, local, variables, tile=4, read_crops=read) == 0
  with sweeps.SweepReader(records[0].path) as reader:
    images = read(reader)[None].astype(np.float32) / 255.0
  # Tiles of 4 frames with the CNN's halo equal the LocalEncoder on the whole sweep.
  whole = dualtrack.LocalEncoder(**local).apply(variables, images)
  np.testing.assert_allclose(cache.load(records[0].sweep_id), whole[0], rtol=1e-5, atol=1e-5)
  # Any change of a frozen weight or of the crop gives another key: nothing stale is read.
  changed = jax.tree.map(lambda x: x, variables)
  changed['params']['cnn']['stem']['0']['kernel'] = (
      changed['params']['cnn']['stem']['0']['kernel'] + 1e-3)
  assert feature_cache.cache_key(local, changed, (32, 32)) != key
  assert feature_cache.cache_key(local, variables, (48, 48)) != key
  moved = dict(variables, batch_stats=jax.tree.map(lambda x: x + 1.0, variables['batch_stats']))
  assert feature_cache.cache_key(local, moved, (32, 32)) != key
  assert feature_cache.cache_key(local, variables, (32, 32)) == key


@pytest.mark.slow
def test_stage3_loss_on_cached_features_equals_the_loss_on_images(tmp_path):
  """Frozen CNN + ViT run in eval mode either way: same loss, same dropout, same gradients."""
  from dualtrack_jax.experiments import local_stage3  # pylint: disable=g-import-not-at-top
  config = _config('local_stage3.py:sim', tmp_path)
  experiment = local_stage3.Experiment(config, load_data=False)
  images = np.random.default_rng(0).integers(0, 256, (1, 20, 32, 32), dtype=np.uint8)
  variables = experiment.init(jax.random.key(1), None)
  features = feature_cache.frame_features(experiment.local, variables,
                                          images.astype(np.float32) / 255.0, tile=4)
  targets = np.random.default_rng(1).normal(size=(1, 19, 6)).astype(np.float32)
  rng = jax.random.key(2)

  def loss_and_grads(batch):
    return jax.value_and_grad(lambda p: experiment.loss_fn(
        {**variables, 'params': p}, batch, rng)[0])(variables['params'])

  loss_images, grads_images = loss_and_grads(dict(images=images, targets=targets))
  loss_features, grads_features = loss_and_grads(dict(features=features, targets=targets))
  np.testing.assert_allclose(loss_features, loss_images, rtol=1e-5)
  np.testing.assert_allclose(grads_features['temporal']['layer_0']['attention']['query']['kernel'],
                             grads_images['temporal']['layer_0']['attention']['query']['kernel'],
                             rtol=1e-4, atol=1e-7)
  # The whole-sweep prediction (tiled features -> head) equals the model's own head.
  head = experiment.model.apply(variables, images.astype(np.float32) / 255.0, head=True)
  np.testing.assert_allclose(experiment.predict(variables, dict(images=images[0])), head[0],
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fusion_loss_on_cached_features_equals_the_loss_on_images(tmp_path):
  from dualtrack_jax.experiments import fusion  # pylint: disable=g-import-not-at-top
  experiment = fusion.Experiment(_config('fusion.py:sim', tmp_path), load_data=False)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1, 20, 32, 32), dtype=np.uint8)
  global_images = rng.random((1, 2, 224, 224), dtype=np.float32)  # Frames 0 and 16.
  variables = experiment.init(jax.random.key(1), {'global_images': global_images})
  features = feature_cache.frame_features(
      experiment.local, common.subtree(variables, 'local_encoder'),
      images.astype(np.float32) / 255.0, tile=4)
  targets = rng.normal(size=(1, 19, 6)).astype(np.float32)

  def loss_and_grads(batch):
    return jax.value_and_grad(lambda p: experiment.loss_fn(
        {**variables, 'params': p}, batch, jax.random.key(2))[0])(variables['params'])

  batch = {'global_images': global_images, 'targets': targets}
  loss_images, grads_images = loss_and_grads({**batch, 'images': images})
  loss_features, grads_features = loss_and_grads({**batch, 'features': features})
  np.testing.assert_allclose(loss_features, loss_images, rtol=1e-5)
  for part in ('global_encoder', 'fusion', 'head'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                 grads_features[part], grads_images[part])
  # The trainer merges the updated collections into the state: same structure as before.
  _, (_, updates) = experiment.loss_fn(variables, {**batch, 'features': features},
                                       jax.random.key(2))
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
      variables['batch_stats'])
