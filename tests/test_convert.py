"""Tests of the torch checkpoint reader (torch_io), the strict converter and launch.convert.

No torch needed: the `.pt` fixtures in tests/fixtures/torch_io/ were written by torch
(scripts/make_torch_io_fixtures.py, with torch's own values in expected.npz), and the key order and
shapes of the original model come from dualtrack_state_dict_keys.txt, recorded from the original
code. Only the to_torch direction of the CLI needs torch, and skips without it.
"""
import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dualtrack_goldens
from dualtrack_jax import convert
from dualtrack_jax import interface
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import local_encoder
from dualtrack_jax.models import resnet2d
from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer
from launch import checkpointing
from launch import config_utils
from launch import convert as convert_cli
from launch import torch_io

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'torch_io')
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                       'dualtrack')
KEYS_FILE = os.path.join(FIXTURES, 'dualtrack_state_dict_keys.txt')
HAS_TORCH = importlib.util.find_spec('torch') is not None


def fixture_path(name: str) -> str:
  return os.path.join(FIXTURES, name)


def read_key_file() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
  """({key: shape} of the 2024 model in the original's order, {key: shape} of the 17 that differ
  in 2025)."""
  model, changed = {}, {}
  with open(KEYS_FILE) as f:
    for line in f:
      target = changed if line.startswith('# ') and '\t' in line else model
      if line.startswith('#') and target is model:
        continue
      key, shape = line.removeprefix('# ').rstrip('\n').split('\t')
      target[key] = tuple(int(s) for s in shape.strip('(),').split(',') if s.strip())
  return model, changed


def subset(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
  return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def zeros_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """A state dict of zeros that takes no memory (broadcast views), int64 BatchNorm counters."""
  return {k: np.broadcast_to(np.zeros((), np.int64 if k.endswith('num_batches_tracked')
                                      else np.float32), s) for k, s in shapes.items()}


def random_variables(template, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), template)


def leaves_equal(a, b) -> bool:
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
  return (flat_a[1] == flat_b[1] and all(
      pa == pb and np.array_equal(np.asarray(x), np.asarray(y))
      for (pa, x), (pb, y) in zip(flat_a[0], flat_b[0])))


@pytest.fixture(name='original', scope='module')
def fixture_original():
  return read_key_file()


@pytest.fixture(name='templates', scope='module')
def fixture_templates():
  """eval_shape variables of both released presets (no 100M-parameter init)."""
  inputs = (jnp.zeros((1, 2, 256, 256)), jnp.zeros((1, 2, 224, 224)))
  return {name: jax.eval_shape(dualtrack.DualTrack(**preset).init, jax.random.key(0), *inputs)
          for name, preset in (('2024', dualtrack.TUS_REC_2024), ('2025', dualtrack.TUS_REC_2025))}


# A reduced DualTrack: every part present, widths of a few channels, P = 8.
TINY = dict(max_positions=8, hidden=16, fusion_layers=2, fusion_heads=2,
            local_cnn_widths=(2, 3, 4, 5), local_cnn_stem_width=2, vit_feature_map_size=2,
            vit_layers=1, vit_heads=2, vit_intermediate=8, local_hidden=8, temporal_layers=1,
            temporal_heads=2, temporal_intermediate=8, global_cnn_widths=(2, 3, 4, 5),
            global_cnn_stem_width=2, global_layers=1, global_heads=2)


def tiny_template(**overrides):
  model = dualtrack.DualTrack(**{**TINY, **overrides})
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 32, 32)),
                        jnp.zeros((1, 2, 32, 32)))


# torch_io ---------------------------------------------------------------------------------------


def test_raw_state_dict_equals_torch_values():
  state = torch_io.load_state_dict(fixture_path('raw_state_dict.pt'))
  with np.load(fixture_path('expected.npz')) as expected:
    names = [k for k in expected.files if not k.startswith('train/')]
    assert list(state) == names
    for key in names:
      value = state[key].view(np.uint16) if key == 'bf16' else state[key]
      assert value.dtype == expected[key].dtype, key
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
      assert state[key].flags.c_contiguous, key
  assert state['bf16'].dtype == ml_dtypes.bfloat16
  assert state['scalar_i64'].shape == () and state['empty'].shape == (0, 3)
  assert state['transposed'].shape == (5, 3)


def test_training_checkpoint_gives_model_without_compile_prefix():
  state = torch_io.load_state_dict(fixture_path('training_checkpoint.pt'))
  with np.load(fixture_path('expected.npz')) as expected:
    model = {k.removeprefix('train/'): expected[k] for k in expected.files
             if k.startswith('train/')}
  assert list(state) == list(model) == ['0.weight', '0.bias', '1.weight', '1.bias',
                                        '1.running_mean', '1.running_var',
                                        '1.num_batches_tracked']
  for key, value in model.items():
    np.testing.assert_array_equal(state[key], value)


def test_load_keeps_plain_data_and_stubs_other_classes():
  checkpoint = torch_io.load(fixture_path('training_checkpoint.pt'))
  assert checkpoint['epoch'] == 3
  assert checkpoint['best_score'] == 4.25 and isinstance(checkpoint['best_score'], np.float64)
  assert checkpoint['config'] == {'model': {'name': 'tiny'}, 'train': {'lr': 1e-4}}
  assert list(checkpoint['model'])[0] == '_orig_mod.0.weight'  # load() keeps keys as written
  # The scheduler objects of the original's WarmupScheduler are never imported.
  scheduler = checkpoint['scheduler']
  assert repr(scheduler['scheduler']) == '<torch.optim.lr_scheduler.CosineAnnealingLR: not loaded>'
  assert repr(scheduler['warmup_config']) == '<src.optimizer.optimizer.WarmupConfig: not loaded>'
  assert scheduler['current_step'] == 1


def test_malicious_pickle_is_refused():
  path = fixture_path('malicious.pt')  # os.system('echo ...') when unpickled by torch.load
  with pytest.raises(ValueError, match=r'malicious\.pt.*posix\.system'):
    torch_io.load_state_dict(path)
  assert repr(torch_io.load(path)) == '<posix.system: not loaded>'


class _CreateFile:
  """Unpickles as open(path, 'w'), which would create the file."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, 'w')


def write_zip(path, records: dict[str, bytes]) -> str:
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in records.items():
      zf.writestr(name, data)
  return str(path)


def test_pickled_code_never_runs(tmp_path):
  marker = tmp_path / 'created_by_pickle'
  payload = pickle.dumps({'model': {'w': _CreateFile(str(marker))}}, protocol=2)
  path = write_zip(tmp_path / 'bad.pt', {'bad/data.pkl': payload})
  with pytest.raises(ValueError, match=r"bad\.pt: state dict entry 'w' is a pickled _?io\.open"):
    torch_io.load_state_dict(path)
  torch_io.load(path)
  assert not marker.exists()


def test_legacy_format_is_refused():
  with pytest.raises(ValueError, match=r'legacy\.pt: not a zip-format.*re-save with torch>=1\.6'):
    torch_io.load_state_dict(fixture_path('legacy.pt'))


def _tensor_pickle(size, stride, offset=0, numel=4) -> bytes:
  """Protocol-2 pickle of {'w': tensor} as torch.save writes it, storage '0' of `numel` floats."""
  glob = lambda module, name: f'c{module}\n{name}\n'.encode()
  text = lambda s: b'X' + struct.pack('<I', len(s)) + s.encode()
  integer = lambda n: b'J' + struct.pack('<i', n)
  tup = lambda *items: b'(' + b''.join(items) + b't'
  storage = tup(text('storage'), glob('torch', 'FloatStorage'), text('0'), text('cpu'),
                integer(numel)) + b'Q'
  args = tup(storage, integer(offset), tup(*map(integer, size)), tup(*map(integer, stride)),
             b'\x89', glob('collections', 'OrderedDict') + b')R')
  return b'\x80\x02}' + text('w') + glob('torch._utils', '_rebuild_tensor_v2') + args + b'Rs.'


def test_strided_views_big_endian_and_bounds(tmp_path):
  values = np.array([1.5, -2.0, 3.25, 4.0], np.float32)
  path = write_zip(tmp_path / 'view.pt', {'view/data.pkl': _tensor_pickle((2,), (2,), offset=1),
                                          'view/data/0': values.tobytes()})
  np.testing.assert_array_equal(torch_io.load_state_dict(path)['w'], [-2.0, 4.0])
  path = write_zip(tmp_path / 'big.pt', {'big/data.pkl': _tensor_pickle((2, 2), (1, 2)),
                                         'big/byteorder': b'big',
                                         'big/data/0': values.astype('>f4').tobytes()})
  np.testing.assert_array_equal(torch_io.load_state_dict(path)['w'], values.reshape(2, 2).T)
  # A view past the end of its storage, and a storage record shorter than announced.
  path = write_zip(tmp_path / 'oob.pt', {'oob/data.pkl': _tensor_pickle((3,), (2,)),
                                         'oob/data/0': values.tobytes()})
  with pytest.raises(ValueError, match=r'oob\.pt: w: a tensor of size \(3,\), stride \(2,\)'):
    torch_io.load_state_dict(path)
  path = write_zip(tmp_path / 'short.pt', {'short/data.pkl': _tensor_pickle((2,), (1,)),
                                           'short/data/0': values[:3].tobytes()})
  with pytest.raises(ValueError, match=r'short/data/0 holds 12 bytes, less than 4 elements'):
    torch_io.load_state_dict(path)


@pytest.mark.skipif(HAS_TORCH, reason='checks the message shown when torch is not installed')
def test_save_state_dict_without_torch(tmp_path):
  with pytest.raises(ImportError, match=r'ultrasound-jax\[convert\]'):
    torch_io.save_state_dict(str(tmp_path / 'x.pt'), {'w': np.zeros(2, np.float32)})


# convert: tables against the original's keys ----------------------------------------------------


def test_dualtrack_2024_keys_order_and_shapes_equal_the_original(original, templates):
  model, _ = original
  assert len(model) == 854
  assert list(convert.torch_shapes(templates['2024'], convert.DUALTRACK).items()) == list(
      model.items())


def test_dualtrack_2025_differs_in_the_17_position_tables(original, templates):
  model, changed = original
  assert len(changed) == 17
  assert convert.torch_shapes(templates['2025'], convert.DUALTRACK) == {**model, **changed}


@pytest.mark.parametrize('table, prefix, block', [
    ('VIDEO_RESNET', 'local_encoder.0.backbone.module.backbone.module.backbone.',
     lambda: (resnet3d.VideoResNet(), jnp.zeros((1, 2, 32, 32, 1)))),
    ('IMAGE_RESNET', 'global_encoder.backbone.0.backbone.',
     lambda: (resnet2d.ImageResNet(), jnp.zeros((1, 32, 32, 1)))),
    ('VIT', 'local_encoder.0.backbone.module.vit.',
     lambda: (transformer.ViTEncoder(), jnp.zeros((1, 16, 16, 512)))),
    ('BERT', 'global_encoder.bert.',
     lambda: (transformer.BertEncoder(8, 8, 1024), jnp.zeros((1, 3, 512)))),
])
def test_block_tables_use_the_original_keys_without_prefix(original, table, prefix, block):
  module, *inputs = block()
  template = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  expected = subset(original[0], prefix)
  assert list(convert.torch_shapes(template, getattr(convert, table)).items()) == list(
      expected.items())


def test_lone_bert_layer_with_cross_attention(original):
  layer = transformer.BertLayer(8, 1024, max_positions=1024, cross_attention=True)
  x = jnp.zeros((1, 3, 512))
  template = jax.eval_shape(layer.init, jax.random.key(0), x, x)
  assert convert.torch_shapes(template, convert.BERT) == subset(original[0],
                                                                'fusion_module.module.layer.0.')


@pytest.mark.parametrize('config_file, prefix', [
    ('local_stage1.py', None), ('local_stage2.py', None), ('local_stage3.py', 'local_encoder.0.'),
    ('global_encoder.py', 'global_encoder.'), ('fusion.py', ''),
])
def test_every_stage_config_exports_the_original_keys(original, config_file, prefix):
  """launch.convert's table per experiment fits the model its config builds (to_torch)."""
  config = config_utils.load_config_file(os.path.join(CONFIGS, config_file))
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.items()}
  frames = lambda size: jax.ShapeDtypeStruct((1, 2, size, size), jnp.float32)
  module, inputs = {
      'local_stage1': (local_encoder.LocalEncoderStage1, (frames(32),)),
      'local_stage2': (dualtrack.LocalEncoder, (frames(256),)),
      'local_stage3': (dualtrack.LocalEncoder, (frames(256),)),
      'global_encoder': (dualtrack.GlobalEncoder, (frames(32), np.arange(2))),
      'fusion': (dualtrack.DualTrack, (frames(256), frames(224))),
  }[config.experiment.rsplit('.', 1)[1]]
  template = jax.eval_shape(module(**kwargs).init, jax.random.key(0), *inputs)
  shapes = convert.torch_shapes(template, interface.TABLES[config.experiment])
  if config_file == 'local_stage1.py':
    expected = {'backbone.' + k: v for k, v in subset(
        original[0], 'local_encoder.0.backbone.module.backbone.module.backbone.').items()}
    expected.update({'fc.weight': (6, 512), 'fc.bias': (6,)})
  elif config_file == 'local_stage2.py':
    expected = {k: tuple(s) for k, s in dualtrack_goldens.load_golden(
        'stage2_chunked').meta['weights']['keys_and_shapes']}
  else:
    expected = subset(original[0], prefix)
  assert list(shapes.items()) == list(expected.items())


# convert: values, strictness --------------------------------------------------------------------


def test_full_size_conversion_fills_every_leaf(original, templates):
  variables = convert.from_torch(zeros_state_dict(original[0]), templates['2024'],
                                 convert.DUALTRACK)
  assert jax.tree.structure(variables) == jax.tree.structure(templates['2024'])
  assert jax.tree.map(lambda v: (v.shape, v.dtype), variables) == jax.tree.map(
      lambda t: (t.shape, t.dtype), templates['2024'])


def test_2024_weights_do_not_fit_the_2025_model(original, templates):
  with pytest.raises(ValueError) as e:
    convert.from_torch(zeros_state_dict(original[0]), templates['2025'], convert.DUALTRACK)
  message = str(e.value)
  assert 'wrong shapes or dtypes (17):' in message and '... and 7 more' in message
  assert ('global_encoder.pos_emb.weight: (1024, 512) in the checkpoint, expected (4096, 512) '
          '(Flax params/global_encoder/pos_emb/embedding (4096, 512))') in message
  assert 'missing' not in message and 'unused' not in message
  with pytest.raises(ValueError, match='allow_reinit needs an initialised template'):
    convert.from_torch(zeros_state_dict(original[0]), templates['2025'], convert.DUALTRACK,
                       allow_reinit='pos_emb')


def test_round_trip_reduced_dualtrack():
  template = tiny_template()
  variables = random_variables(template)
  state = convert.to_torch(variables, convert.DUALTRACK)
  assert list(state.items())[0][0] == 'global_encoder.backbone.0.backbone.stem.0.weight'
  back = convert.from_torch(state, template, convert.DUALTRACK)
  assert leaves_equal(back, variables)
  again = convert.to_torch(back, convert.DUALTRACK)
  assert list(again) == list(state)
  assert all(np.array_equal(again[k], state[k]) and again[k].dtype == state[k].dtype
             for k in state)
  # Layouts, checked one by one against the Flax leaves.
  params, stats = variables['params'], variables['batch_stats']
  cnn = params['local_encoder']['cnn']['layer2']['0']['conv1']['0']['kernel']  # (kT,kH,kW,I,O)
  np.testing.assert_array_equal(
      state['local_encoder.0.backbone.module.backbone.module.backbone.layer2.0.conv1.0.weight'],
      cnn.transpose(4, 3, 0, 1, 2))
  image = params['global_encoder']['backbone']['stem']['0']['kernel']  # (kH, kW, I, O)
  np.testing.assert_array_equal(state['global_encoder.backbone.0.backbone.stem.0.weight'],
                                image.transpose(3, 2, 0, 1)[:, :, None])
  patch = params['local_encoder']['vit']['embeddings']['patch_embeddings']['kernel']
  np.testing.assert_array_equal(
      state['local_encoder.0.backbone.module.vit.embeddings.patch_embeddings.projection.weight'],
      patch.transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state['local_encoder.1.weight'],
                                params['local_encoder']['proj']['kernel'].T)
  np.testing.assert_array_equal(
      state['fusion_module.module.layer.1.crossattention.self.value.weight'],
      params['fusion']['layer_1']['crossattention']['value']['kernel'].T)
  np.testing.assert_array_equal(
      state['fusion_module.module.layer.0.attention.self.distance_embedding.weight'],
      params['fusion']['layer_0']['attention']['distance_embedding']['embedding'])
  np.testing.assert_array_equal(
      state['global_encoder.backbone.0.backbone.layer3.0.downsample.1.running_var'],
      stats['global_encoder']['backbone']['layer3']['0']['downsample']['1']['var'])
  counter = state['global_encoder.backbone.0.backbone.stem.1.num_batches_tracked']
  assert counter.shape == () and counter.dtype == np.int64


def test_round_trip_bfloat16_parameters():
  template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), tiny_template())
  variables = random_variables(template)
  state = convert.to_torch(variables, convert.DUALTRACK)
  assert state['head.fc.weight'].dtype == ml_dtypes.bfloat16
  assert leaves_equal(convert.from_torch(state, template, convert.DUALTRACK), variables)


def test_local_stage1_fixture_round_trip():
  state = torch_io.load_state_dict(fixture_path('local_stage1_tiny.pt'))
  model = local_encoder.LocalEncoderStage1(widths=(3, 4, 5, 6), stem_width=2)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 32, 32)))
  back = convert.to_torch(convert.from_torch(state, template, convert.LOCAL_STAGE1),
                          convert.LOCAL_STAGE1)
  assert list(back) == list(state)
  for key, value in state.items():
    if key.endswith('num_batches_tracked'):  # Flax does not count batches: written as 0.
      assert value == 123 and back[key] == 0 and back[key].shape == ()
    else:
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_stage1_target_scaling_is_folded_into_fc_for_torch():
  kw = dict(widths=(3, 4, 5, 6), stem_width=2)
  mean, std = (0.1, -0.2, 0.3, 0.0, 0.5, -0.6), (0.5, 2.0, 0.1, 1.0, 3.0, 0.7)
  scaled = local_encoder.LocalEncoderStage1(**kw, target_mean=mean, target_std=std)
  images = jax.random.uniform(jax.random.key(1), (1, 3, 32, 32))
  variables = scaled.init(jax.random.key(0), images)
  folded = interface._fold_target_scaling(variables, {'target_mean': mean, 'target_std': std})
  plain = local_encoder.LocalEncoderStage1(**kw)
  np.testing.assert_allclose(plain.apply(folded, images), scaled.apply(variables, images),
                             rtol=1e-5, atol=1e-6)


def test_allow_reinit_keeps_the_template_values_of_listed_tensors_only():
  small = convert.to_torch(random_variables(tiny_template(max_positions=4), seed=1),
                           convert.DUALTRACK)
  template = tiny_template()
  with pytest.raises(ValueError, match=r'wrong shapes or dtypes \(4\)') as e:
    convert.from_torch(small, template, convert.DUALTRACK)
  assert ('global_encoder.pos_emb.weight: (4, 16) in the checkpoint, expected (8, 16)'
          in str(e.value))
  initial = random_variables(template, seed=2)  # stands for model.init: concrete values
  with pytest.raises(ValueError, match=r'(?s)wrong shapes or dtypes \(1\):\n +global_encoder'
                                       r'\.pos_emb'):
    convert.from_torch(small, initial, convert.DUALTRACK, allow_reinit='distance_embedding')
  variables = convert.from_torch(small, initial, convert.DUALTRACK,
                                 allow_reinit='pos_emb|distance_embedding')
  state = convert.to_torch(variables, convert.DUALTRACK)
  initial_state = convert.to_torch(initial, convert.DUALTRACK)
  for key in state:
    expected = initial_state if 'pos_emb' in key or 'distance_embedding' in key else small
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_errors_name_missing_unused_and_misshapen_keys():
  template = tiny_template()
  state = convert.to_torch(random_variables(template), convert.DUALTRACK)
  broken = dict(state)
  del broken['head.fc.bias']
  broken['head.extra'] = np.zeros(3, np.float32)
  broken['local_encoder.1.weight'] = np.zeros((8, 16), np.float32)
  broken['global_encoder.backbone.0.backbone.stem.1.num_batches_tracked'] = np.zeros(2, np.int64)
  with pytest.raises(ValueError) as e:
    convert.from_torch(broken, template, convert.DUALTRACK)
  message = str(e.value)
  assert 'missing keys, in the model but not in the state dict (1):\n    head.fc.bias' in message
  assert 'unused keys, in the state dict but not in the model (1):\n    head.extra' in message
  assert ('local_encoder.1.weight: (8, 16) in the checkpoint, expected (16, 8) '
          '(Flax params/local_encoder/proj/kernel (8, 16))') in message
  assert ('global_encoder.backbone.0.backbone.stem.1.num_batches_tracked: int64[2] in the '
          'checkpoint, expected a scalar integer') in message
  # A state dict with an extra prefix: every key is both missing and unused, 10 of each listed.
  prefixed = {'module.' + k: v for k, v in state.items()}
  with pytest.raises(ValueError, match=rf'(?s)missing keys.* \({len(state)}\):.*and '
                                       rf'{len(state) - 10} more'):
    convert.from_torch(prefixed, template, convert.DUALTRACK)


def test_integer_tensor_for_a_parameter_is_refused():
  template = tiny_template()
  state = convert.to_torch(random_variables(template), convert.DUALTRACK)
  state['head.fc.bias'] = np.zeros(6, np.int64)
  with pytest.raises(ValueError, match=r'head\.fc\.bias: dtype int64 in the checkpoint, expected '
                                       r'floating point'):
    convert.from_torch(state, template, convert.DUALTRACK)


# launch.convert ----------------------------------------------------------------------------------


def test_cli_from_torch_writes_a_run_folder(tmp_path):
  source = fixture_path('local_stage1_tiny.pt')
  out = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'launch.convert', f'--from={source}', f'--to={out}',
       '--model=local_stage1'], capture_output=True, text=True, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  directory, step = checkpointing.find_checkpoint(str(out), 'best')
  assert (directory, step) == (str(out / 'best'), 0)
  variables, config = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert config['experiment'] == 'dualtrack_jax.experiments.local_stage1'
  # The original's head has no output scaling: identity standardisation.
  assert config['model'] == {'widths': [3, 4, 5, 6], 'stem_width': 2,
                             'temporal_kernels': [3, 3, 3, 3], 'target_mean': [0.0] * 6,
                             'target_std': [1.0] * 6, 'causal': False,
                             'conv3d_implementation': 'frame_conv'}
  assert config['data']['crop'] == [256, 256]  # the rest is configs/dualtrack/local_stage1.py
  state = torch_io.load_state_dict(source)
  params, stats = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(params['backbone']['stem']['0']['kernel'],
                                state['backbone.stem.0.weight'].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params['backbone']['layer4']['1']['conv2']['1']['scale'],
                                state['backbone.layer4.1.conv2.1.weight'])
  np.testing.assert_array_equal(stats['backbone']['layer2']['0']['downsample']['1']['mean'],
                                state['backbone.layer2.0.downsample.1.running_mean'])
  np.testing.assert_array_equal(params['fc']['kernel'], state['fc.weight'].T)
  assert sorted(os.listdir(tmp_path)) == ['run']


def test_cli_failures_leave_nothing(tmp_path):
  source = fixture_path('local_stage1_tiny.pt')
  with pytest.raises(ValueError, match=r'(?s)local_stage1_tiny\.pt \(--model=tus_rec_2024\): '
                                       r'.*missing keys'):
    convert_cli.convert_from_torch(source, str(tmp_path / 'run'), 'tus_rec_2024')
  with pytest.raises(ValueError, match=r'not a stage-1 local encoder'):
    convert_cli.convert_from_torch(fixture_path('raw_state_dict.pt'), str(tmp_path / 'run'),
                                   'local_stage1')
  with pytest.raises(ValueError, match=r"--model='dualtrack': unknown; known: ijepa, "
                                       r'local_stage1, sonichu, tus_rec_2024, tus_rec_2025, '
                                       r'two_frame_cnn'):
    convert_cli.convert_from_torch(source, str(tmp_path / 'run'), 'dualtrack')
  with pytest.raises(ValueError, match="--variant='sim': DualTrack conversions use the full"):
    convert_cli.convert_from_torch(source, str(tmp_path / 'run'), 'local_stage1', variant='sim')
  assert os.listdir(tmp_path) == []
  (tmp_path / 'taken').mkdir()
  with pytest.raises(FileExistsError, match='never overwrite'):
    convert_cli.convert_from_torch(source, str(tmp_path / 'taken'), 'local_stage1')


@pytest.mark.slow  # lazy_init of even a tiny model takes about 20 s on a shared 2-core CPU
def test_cli_allow_reinit_changes_nothing_that_fits(tmp_path):
  source = fixture_path('local_stage1_tiny.pt')
  strict = convert_cli.convert_from_torch(source, str(tmp_path / 'strict'), 'local_stage1')
  # The initialised template (lazy_init) is only read for tensors that do not fit: none here.
  lenient = convert_cli.convert_from_torch(source, str(tmp_path / 'lenient'), 'local_stage1',
                                           allow_reinit='.*', seed=3)
  assert leaves_equal(strict, lenient)


@pytest.mark.skipif(not HAS_TORCH, reason='writing .pt files needs torch (the convert extra)')
def test_cli_to_torch_round_trip(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  source = fixture_path('local_stage1_tiny.pt')
  convert_cli.convert_from_torch(source, str(tmp_path / 'run'), 'local_stage1')
  out = str(tmp_path / 'back.pt')
  convert_cli.convert_to_torch(str(tmp_path / 'run'), out)
  original = torch.load(source)
  back = torch.load(out)
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].shape == value.shape and back[key].dtype == value.dtype, key
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(back[key], value), key
  assert sorted(os.listdir(tmp_path)) == ['back.pt', 'run']
