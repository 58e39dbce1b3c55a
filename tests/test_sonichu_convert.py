"""SONICHU weight import/export: PyTorch parity goldens, strictness, safetensors, full-size names.

The goldens in tests/fixtures/sonichu/ come from scripts/record_sonichu_goldens.py (torch 2.13, timm
1.0.19, facebookresearch/ijepa 52c1ae9); no torch is needed here.
"""
import functools
import json
import os

import jax
import numpy as np
import pytest

from launch import checkpointing
from launch import config_utils
from launch import convert as convert_cli
from launch import torch_io
from sonichu_jax import convert
from sonichu_jax.experiments import keypoints
from sonichu_jax.models import sonichu
from sonichu_jax.models.heads import ViTPoseHead
from sonichu_jax.models.vit import sincos_pos_embed
from sonichu_jax.models.vit import VisionTransformer

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'sonichu')
TINY = dict(embed_dim=32, depth=2, num_heads=2)
RTOL = 1e-4  # Relative to the largest magnitude of the reference.


def _fixture(name):
  return os.path.join(FIXTURES, name)


@pytest.fixture(scope='module')
def goldens():
  return dict(np.load(_fixture('goldens.npz')))


@pytest.fixture(scope='module')
def vit_apply():
  return jax.jit(VisionTransformer(**TINY).apply)


def _assert_close(actual, expected):
  expected = np.asarray(expected)
  err = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
  assert err <= RTOL, f'relative error {err:.2e}'


def test_timm_backbone_matches_timm(goldens, vit_apply):
  params = convert.backbone_from_timm(torch_io.read_safetensors(_fixture('timm_vit.safetensors')),
                                      (4, 4))
  _assert_close(vit_apply({'params': params}, goldens['images']), goldens['timm/features'])


def test_ijepa_encoders_match_ijepa(goldens, vit_apply):
  checkpoint = torch_io.read_checkpoint(_fixture('ijepa.pth'))
  for encoder, name in (('target_encoder', 'target'), ('encoder', 'encoder')):
    params = convert.backbone_from_ijepa(checkpoint, (4, 4), encoder=encoder)
    _assert_close(vit_apply({'params': params}, goldens['images']),
                  goldens[f'ijepa/features_{name}'])
  # Our sin-cos initialisation is I-JEPA's table.
  np.testing.assert_allclose(sincos_pos_embed((4, 4), 32), goldens['ijepa/sincos_pos_embed'],
                             atol=1e-7)
  with pytest.raises(ValueError, match="encoder must be 'target_encoder' or 'encoder', got 'ema'"):
    convert.backbone_from_ijepa(checkpoint, (4, 4), encoder='ema')


def test_timm_class_token_dropped_and_position_table_resampled(goldens):
  params = convert.backbone_from_timm(torch_io.read_safetensors(_fixture('timm_cls.safetensors')),
                                      (4, 4))
  _assert_close(params['pos_embed'], goldens['timm_cls/pos_embed_4x4'])
  assert set(params) == {'patch_embed', 'pos_embed', 'blocks_0', 'norm'}
  _assert_close(convert.resample_pos_embed(goldens['resample/src_5x5'], (5, 5), (4, 3)),
                goldens['resample/dst_4x3'])


def test_vitpose_backbone_and_head_match_mmpose_layout(goldens):
  checkpoint = torch_io.read_checkpoint(_fixture('vitpose.pth'))
  vit = VisionTransformer(patch_padding=2, **TINY)
  params = convert.backbone_from_vitpose(checkpoint, (4, 3))
  features = vit.apply({'params': params}, goldens['vitpose/images'])
  _assert_close(features, goldens['vitpose/features'])
  head = ViTPoseHead(2, filters=16)
  template = jax.eval_shape(head.init, jax.random.key(0), features)
  variables = convert.head_from_vitpose(checkpoint, template)
  _assert_close(head.apply(variables, features), goldens['vitpose/heatmaps'])


def test_vitpose_head_into_a_task_with_another_keypoint_count(goldens):
  checkpoint = torch_io.read_checkpoint(_fixture('vitpose.pth'))
  head = ViTPoseHead(4, filters=16)
  features = np.zeros((1, 4, 3, 32), np.float32)
  template = jax.eval_shape(head.init, jax.random.key(0), features)
  with pytest.raises(ValueError, match=r'keypoint_head\].*final_layer.weight: \(2, 16, 1, 1\) .*'
                                       r'expected Flax final_layer/kernel \(1, 1, 16, 4\)'):
    convert.head_from_vitpose(checkpoint, template)
  initial = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), template)
  variables = convert.head_from_vitpose(checkpoint, initial, final_layer=False)
  np.testing.assert_array_equal(variables['params']['final_layer']['kernel'], 0.5)
  np.testing.assert_array_equal(variables['params']['deconv_layers_0']['kernel'],
                                checkpoint['state_dict']['keypoint_head.deconv_layers.0.weight']
                                .transpose(2, 3, 1, 0))


@pytest.fixture(scope='module')
def tiny_sonichu():
  model = sonichu.SonichuModel(tasks=('FUGC', 'HC'), head_filters=16, **TINY)
  template = sonichu.abstract_variables(model, (64, 64))
  state_dict = torch_io.read_safetensors(_fixture('sonichu_tiny.safetensors'))
  return model, template, state_dict


def test_sonichu_file_matches_torch_model(goldens, tiny_sonichu):
  model, template, state_dict = tiny_sonichu
  variables = convert.from_sonichu(state_dict, template)
  cold = model.clone(temperature=0.25)

  @functools.partial(jax.jit, static_argnums=2)
  def outputs(v, x, task):
    return (model.apply(v, x, task, method=model.heatmaps), model.apply(v, x, task),
            model.apply(v, x, task, tta=True), cold.apply(v, x, task))

  for task in ('FUGC', 'HC'):
    heatmaps, coords, tta, coords_cold = outputs(variables, goldens['images'], task)
    _assert_close(heatmaps, goldens[f'sonichu/heatmaps_{task}'])
    _assert_close(coords, goldens[f'sonichu/coords_{task}'])
    _assert_close(tta, goldens[f'sonichu/tta_{task}'])
    _assert_close(coords_cold, goldens[f'sonichu/coords_{task}_t0.25'])


def test_sonichu_export_round_trip(tmp_path, tiny_sonichu):
  _, template, state_dict = tiny_sonichu
  variables = convert.from_sonichu(state_dict, template)
  exported = convert.to_sonichu(variables)
  assert set(exported) == set(state_dict)
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      assert exported[key].dtype == np.int64 and exported[key].shape == ()
    else:
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  path = str(tmp_path / 'model.safetensors')
  torch_io.write_safetensors(path, exported, metadata={'format': 'pt'})
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
  assert n % 8 == 0 and header['__metadata__'] == {'format': 'pt'}
  entry = header['backbone.pos_embed']
  assert entry['dtype'] == 'F32' and entry['shape'] == [1, 16, 32]
  again = torch_io.read_safetensors(path)
  assert list(again) == list(exported)
  jax.tree.map(np.testing.assert_array_equal, again, exported)


def test_safetensors_dtypes_and_errors(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  tensors = {'a': np.arange(6, dtype=np.float16).reshape(2, 3),
             'b': np.array([1.5, -2.0], ml_dtypes.bfloat16), 'c': np.array(7, np.int64),
             'd': np.array([True, False])}
  path = str(tmp_path / 'x.safetensors')
  torch_io.write_safetensors(path, tensors)
  again = torch_io.read_safetensors(path)
  for k, v in tensors.items():
    assert again[k].dtype == v.dtype and again[k].shape == v.shape
    np.testing.assert_array_equal(again[k], v)
  with pytest.raises(ValueError, match="tensor 'e' has unsupported dtype complex64"):
    torch_io.write_safetensors(path, {'e': np.zeros(2, np.complex64)})
  raw = open(path, 'rb').read()
  truncated = str(tmp_path / 'truncated.safetensors')
  open(truncated, 'wb').write(raw[:-4])
  # Data are laid out by element size: c (8 bytes), a (12), b (4), d (2); a cut of 4 bytes breaks b.
  with pytest.raises(ValueError, match=r"truncated.safetensors: tensor 'b' of BF16\[2\] has byte "
                                       r'range \[20, 24\) in a data section of 22 bytes'):
    torch_io.read_safetensors(truncated)
  garbage = str(tmp_path / 'garbage.safetensors')
  open(garbage, 'wb').write(b'\xff' * 16)
  with pytest.raises(ValueError, match='garbage.safetensors: not a safetensors file'):
    torch_io.read_safetensors(garbage)


def test_strict_import_names_missing_unused_and_misshapen_keys(tiny_sonichu):
  _, template, state_dict = tiny_sonichu
  broken = dict(state_dict)
  del broken['heads.HC.deconv_layers.4.running_var']
  broken['heads.HC.extra.weight'] = np.zeros(3, np.float32)
  broken['backbone.blocks.1.mlp.fc1.weight'] = np.zeros((128, 31), np.float32)
  with pytest.raises(ValueError) as err:
    convert.from_sonichu(broken, template, source='model.safetensors')
  message = str(err.value)
  assert message.startswith('model.safetensors: missing 1 tensors: '
                            'heads.HC.deconv_layers.4.running_var.')
  assert '1 tensors would be unused: heads.HC.extra.weight.' in message
  assert ('backbone.blocks.1.mlp.fc1.weight: (128, 31) (as Flax (31, 128)), expected Flax '
          'backbone/blocks_1/mlp/fc1/kernel (32, 128)') in message
  # A timm checkpoint of another variant (layer scale) is refused, not silently half-loaded.
  timm = torch_io.read_safetensors(_fixture('timm_vit.safetensors'))
  with pytest.raises(ValueError, match=r'timm state dict: 1 tensors would be unused: '
                                       r'blocks.0.ls1.gamma'):
    convert.backbone_from_timm({**timm, 'blocks.0.ls1.gamma': np.ones(32, np.float32)}, (4, 4))
  with pytest.raises(ValueError, match=r'pos_embed has 10 patch rows, which is neither the target '
                                       r'grid \(4, 4\) nor square; pass its source grid'):
    convert.backbone_from_timm({**timm, 'pos_embed': np.zeros((1, 10, 32), np.float32)}, (4, 4))


def test_torch_names_of_flax_paths():
  assert convert.torch_key('params', ('blocks_11', 'attn', 'qkv', 'kernel')) == \
      'blocks.11.attn.qkv.weight'
  assert convert.torch_key('batch_stats', ('heads_fetal_femur', 'deconv_layers_1', 'mean')) == \
      'heads.fetal_femur.deconv_layers.1.running_mean'
  assert convert.torch_key('params', ('backbone', 'norm', 'scale')) == 'backbone.norm.weight'
  assert convert.torch_key('params', ('backbone', 'pos_embed')) == 'backbone.pos_embed'


def test_full_size_names_and_shapes_are_timms():
  """SONICHU-124M's backbone exports timm's ViT-B/16 (256x256, no class token) keys and shapes."""
  with open(_fixture('timm_vit_b16_256_keys.json')) as f:
    timm_shapes = {k: tuple(v) for k, v in json.load(f).items()}
  variables = sonichu.abstract_variables(sonichu.SonichuModel())
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), variables)
  exported = convert.to_sonichu(zeros)
  backbone = {k.removeprefix('backbone.'): v.shape for k, v in exported.items()
              if k.startswith('backbone.')}
  assert backbone == timm_shapes
  heads = [k for k in exported if k.startswith('heads.')]
  assert len(heads) == 9 * 14  # Deconv, 5 BN tensors, deconv, 5 BN tensors, final weight and bias.
  assert exported['heads.PLAX.deconv_layers.0.weight'].shape == (768, 256, 4, 4)
  assert exported['heads.PLAX.final_layer.weight'].shape == (22, 256, 1, 1)
  assert exported['heads.A4C.deconv_layers.4.running_var'].shape == (256,)


def test_launch_convert_writes_a_sonichu_run_folder(tmp_path):
  config = config_utils.load_config_file('configs/sonichu/keypoints.py:sim')
  model = keypoints.build_model(config)
  variables = sonichu.init_variables(model, jax.random.key(3))
  path = str(tmp_path / 'sonichu.safetensors')
  torch_io.write_safetensors(path, convert.to_sonichu(variables))
  out = str(tmp_path / 'run')
  convert_cli.convert_from_torch(path, out, 'sonichu', variant='sim')
  directory, step = checkpointing.find_checkpoint(out, 'best')
  restored, saved = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert saved['experiment'] == config.experiment
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(dict(variables)), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='heads'):  # The full model has more than the file.
    convert_cli.convert_from_torch(path, str(tmp_path / 'full'), 'sonichu')
  assert not os.path.exists(tmp_path / 'full')
