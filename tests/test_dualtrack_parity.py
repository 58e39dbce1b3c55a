"""Parity with the original PyTorch DualTrack: our modules + `convert.from_torch` vs its outputs.

Every test rebuilds a block's state dict in the original layout from its golden (seeded weights,
tests/fixtures/dualtrack/, recorded by scripts/record_dualtrack_goldens.py from upstream commit
27cc3f3), converts it with the converter's table for that block, runs our module in float32 and
requires max |ours - original| / max |original| <= 1e-4 for every recorded output. No torch needed.
"""
import dataclasses

import flax
import jax
import numpy as np
import pytest

import dualtrack_goldens
from dualtrack_jax import convert
from dualtrack_jax import pose
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import resnet2d
from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer

RTOL = 1e-4  # of the output's max abs value, float32


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # The goldens are float32; keep XLA from using reduced-precision (TF32) matmuls on GPUs.
  with jax.default_matmul_precision('highest'):
    yield


def relative_error(ours, original) -> float:
  """max |ours - original| / max |original|."""
  ours, original = np.asarray(ours, np.float64), np.asarray(original, np.float64)
  assert ours.shape == original.shape, (ours.shape, original.shape)
  return float(np.max(np.abs(ours - original)) / np.max(np.abs(original)))


def assert_parity(ours, original, what: str) -> None:
  error = relative_error(ours, original)
  assert error <= RTOL, f'{what}: max |ours - original| / max |original| = {error:.2e} > {RTOL}'


def convert_golden(golden: dualtrack_goldens.Golden, table: convert.Table, model, *args) -> dict:
  """The golden's weights as our variables for `model` (strict: every key, leaf and shape)."""
  template = jax.eval_shape(model.init, jax.random.key(0), *args)
  return convert.from_torch(golden.state_dict(), template, table)


def channels_last(x: np.ndarray) -> np.ndarray:
  """torch (B, C, T, H, W) -> (B, T, H, W, C)."""
  return np.moveaxis(x, 1, -1)


def fold_frames(x: np.ndarray) -> np.ndarray:
  """torch (B, N, C, H, W) -> (B * N, H, W, C)."""
  return np.moveaxis(x, 2, -1).reshape(-1, *x.shape[3:], x.shape[2])


@pytest.mark.parametrize('name,temporal_kernels', [('cnn3d_large', resnet3d.LARGE_WINDOW),
                                                   ('cnn3d_small', resnet3d.SMALL_WINDOW)])
def test_video_resnet(name, temporal_kernels):
  """Stage-1 3D CNN (`video_rn18_base` / `_small_temporal_context`): layer4 maps within 1e-4."""
  golden = dualtrack_goldens.load_golden(name)
  frames = channels_last(golden.random_input('frames'))
  model = resnet3d.VideoResNet(temporal_kernels=temporal_kernels)
  variables = convert_golden(golden, convert.VIDEO_RESNET, model, frames)
  assert_parity(jax.jit(model.apply)(variables, frames),
                channels_last(golden.outputs['features']), name)


def test_image_resnet():
  """Global 2D CNN (`video_rn18_no_temporal`, Conv3d kT=1 weights): per-frame maps within 1e-4."""
  golden = dualtrack_goldens.load_golden('cnn2d_global')
  frames = fold_frames(golden.random_input('frames'))
  model = resnet2d.ImageResNet()
  variables = convert_golden(golden, convert.IMAGE_RESNET, model, frames)
  assert_parity(jax.jit(model.apply)(variables, frames),
                fold_frames(golden.outputs['features']), 'cnn2d_global')


def test_vit():
  """Stage-2 ViT on 512 x 16 x 16 CNN maps: CLS tokens (after the final LayerNorm) within 1e-4."""
  golden = dualtrack_goldens.load_golden('vit_stage2')
  maps = fold_frames(golden.random_input('feature_maps'))
  model = transformer.ViTEncoder()
  variables = convert_golden(golden, convert.VIT, model, maps)
  assert_parity(jax.jit(model.apply)(variables, maps), golden.outputs['cls'].reshape(-1, 64),
                'vit_stage2')


def test_temporal_bert():
  """Stage-3 temporal BERT (4 layers, relative key P=1024) on 40 tokens within 1e-4."""
  golden = dualtrack_goldens.load_golden('temporal_bert')
  tokens = golden.random_input('tokens')
  model = transformer.BertEncoder(num_layers=4, num_heads=4, intermediate_size=32,
                                  max_positions=1024)
  variables = convert_golden(golden, convert.BERT, model, tokens)
  assert_parity(jax.jit(model.apply)(variables, tokens), golden.outputs['hidden'],
                'temporal_bert')


def test_fusion_bert():
  """Fusion BERT layers (relative-key self-attention, cross-attention, P=1024) within 1e-4."""
  golden = dualtrack_goldens.load_golden('fusion_bert')
  local, context = golden.random_input('local_tokens'), golden.random_input('global_tokens')
  model = transformer.BertEncoder(num_layers=2, num_heads=8, intermediate_size=1024,
                                  max_positions=1024, cross_attention=True)
  variables = convert_golden(golden, convert.BERT, model, local, context)
  assert_parity(jax.jit(model.apply)(variables, local, context), golden.outputs['hidden'],
                'fusion_bert')


def test_global_encoder():
  """Global encoder with per-sweep absolute indices: tokens and pretraining-head poses, 1e-4."""
  golden = dualtrack_goldens.load_golden('global_encoder')
  images = golden.random_input('images')[:, :, 0]  # (B, M, H, W)
  indices = golden.inputs['sample_indices']
  model = dualtrack.GlobalEncoder()
  variables = convert_golden(golden, convert.GLOBAL_ENCODER, model, images, indices)

  @jax.jit
  def run(variables, images, indices):
    return (model.apply(variables, images, indices),
            model.apply(variables, images, indices, head=True))

  tokens, poses = run(variables, images, indices)
  assert_parity(tokens, golden.outputs['features'], 'global_encoder tokens')
  assert_parity(poses, golden.outputs['local_poses'], 'global_encoder head')


@pytest.mark.slow
def test_local_stage2_torch_chunk():
  """Stage 2 (CNN + ViT) with the 2025 model's inexact torch.chunk chunking, within 1e-4.

  10 frames of 256 x 256 with max_subsequence 4 (chunks 4, 4, 2); the chunked outputs differ from
  whole-sweep ones by far more than the tolerance, so matching them proves the chunking.
  """
  golden = dualtrack_goldens.load_golden('stage2_chunked')
  frames = golden.random_input('frames')[:, :, 0]
  model = dualtrack.LocalEncoder(stage=2, cnn_chunking='torch_chunk', max_subsequence=4)
  variables = convert_golden(golden, convert.LOCAL_STAGE2, model, frames)
  tokens = jax.jit(model.apply)(variables, frames)
  assert_parity(tokens, golden.outputs['cls'], 'stage2_chunked')
  assert relative_error(tokens, golden.outputs['cls_unchunked']) > 100 * RTOL


@pytest.mark.slow
def test_dualtrack_2024_end_to_end():
  """Whole TUS-REC 2024 model on 17 frames: every stage, the poses and the trajectory, 1e-4.

  Stages (Flax intermediates vs the original's forward hooks): stage-2 ViT CLS tokens, stage-3
  temporal BERT, projected local tokens, global tokens (grid indices 0 and 16), fusion output;
  then the (1, 16, 6) poses and the global trajectory G_0 = I, G_{k+1} = G_k R(pose_k) composed
  by `pose.compose_relative` vs the original's
  `get_global_and_relative_pred_trackings_from_vectors`.
  """
  golden = dualtrack_goldens.load_golden('dualtrack_2024')
  local = golden.random_input('local_images')[:, :, 0]
  global_ = golden.random_input('global_images')[:, :, 0]
  model = dualtrack.DualTrack(**dualtrack.TUS_REC_2024)
  variables = convert_golden(golden, convert.DUALTRACK, model, local, global_)
  stages = {'vit': 'local_stage2', 'temporal': 'local_stage3', 'local_encoder': 'local_tokens',
            'global_encoder': 'global_tokens', 'fusion': 'fusion'}

  @jax.jit
  def run(variables, local, global_):
    return model.apply(variables, local, global_, mutable='intermediates',
                       capture_intermediates=lambda module, method: (
                           method == '__call__' and module.name in stages))

  poses, state = run(variables, local, global_)
  # {(..., module name, '__call__'): (output,)} -> {module name: output}
  captured = {path[-2]: value[0] for path, value in
              flax.traverse_util.flatten_dict(state['intermediates']).items()}
  assert set(captured) == set(stages)
  for module, value in captured.items():
    expected = golden.outputs[stages[module]]
    assert_parity(np.reshape(value, expected.shape), expected, f'dualtrack_2024 {module}')
  assert_parity(poses, golden.outputs['poses'], 'dualtrack_2024 poses')
  trajectory = pose.compose_relative(pose.pose_vector_to_matrix(np.asarray(poses[0], np.float64)))
  assert_parity(trajectory, golden.outputs['global_trajectory'], 'dualtrack_2024 trajectory')


def test_regenerated_weights_are_checked():
  """A golden whose weight seed does not reproduce the recorded hash is refused, not compared."""
  golden = dualtrack_goldens.load_golden('vit_stage2')
  meta = {**golden.meta, 'weights': {**golden.meta['weights'], 'seed': 0}}
  with pytest.raises(ValueError, match='regenerated weights differ'):
    dataclasses.replace(golden, meta=meta).state_dict()
