"""Records DualTrack parity goldens from the original PyTorch code (needs torch; never run in CI).

    python scripts/record_dualtrack_goldens.py --original=/path/to/DualTrack \
        [--out=tests/fixtures/dualtrack] [--only=cnn3d_large,fusion_bert] [--commit=SHA]

`--original` is a checkout of github.com/ImFusionGmbH/DualTrack (imported from there, never copied
into this repository). Its environment needs torch, transformers (4.55; 4.57 behaves the same on
these code paths), timm, einops, omegaconf, scipy, h5py, matplotlib and torchvision (a pure-Python
copy of the wheel is enough: docs/dualtrack.md, section "Reference environment").

Every block is built with the original's own builders, filled with `random_state_dict` weights by
a strict `load_state_dict`, and run in float32, eval mode, under `torch.no_grad()`. See
tests/fixtures/dualtrack/README.md for what each file holds and tests/dualtrack_goldens.py for the
format.
"""
import argparse
from collections.abc import Callable
import dataclasses
import os
import platform
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
import dualtrack_goldens  # noqa: E402  (tests/, importable without jax or torch)


@dataclasses.dataclass(frozen=True)
class Block:
  """One golden: how to build the original block and what to feed it.

  Attributes:
    description: one line for the README and the metadata.
    builder: the original's builder call, as text for the record.
    build: returns (module whose state dict is recorded, callable from inputs to outputs).
    weight_seed: seed of `random_state_dict`.
    random_inputs: name -> (shape, 'uniform' | 'normal', seed), in the original layout.
    stored_inputs: name -> integer array stored in the file.
  """
  description: str
  builder: str
  build: Callable
  weight_seed: int
  random_inputs: dict = dataclasses.field(default_factory=dict)
  stored_inputs: dict = dataclasses.field(default_factory=dict)


def _blocks(torch, nn) -> dict[str, Block]:
  """The recorded blocks; imports the original's modules (needs `--original` on sys.path)."""
  from src.models import global_encoder, local_encoder, spatio_temporal_attn, video_resnet
  from src.models.fusion_model import fusion_model
  from src.models.fusion_model.fusion_model import _get_bert_encoder
  from src.models.utils import BertWrapper
  from src.utils import pose

  def video_cnn(factory):
    def build():
      # VideoResnetFeaturesOnly: (B, C, T, H, W) -> layer4 map (B, 512, T, H/16, W/16).
      model = factory()
      return model, lambda x: {'features': model(x['frames'])}
    return build

  def global_cnn():
    # The global encoder's image backbone: VideoResnetWrapperForFeatureMaps(video_rn18_no_temporal)
    # on (B, N, C, H, W); weights recorded without the wrapper's `backbone.` prefix.
    wrapper = global_encoder.simple_rn_no_temporal_backbone()
    return wrapper.backbone, lambda x: {'features': wrapper(x['frames'])}

  def vit():
    # Stage 2 on given CNN feature maps (its `input_type='features'` path), CLS tokens out.
    model = local_encoder.FeatureExtractorWithSpatialSelfAttentionV1(
        nn.Identity(), features_only=True, input_type='features')
    return model.vit, lambda x: {'cls': model(x['feature_maps'])}

  def temporal():
    model = spatio_temporal_attn.SimpleTemporalAttn(features_only=True,
                                                    max_position_embeddings=1024)
    return model.encoder, lambda x: {'hidden': model(x['tokens'])}

  def global_enc():
    model = global_encoder.global_encoder_cnn(features_only=True)

    def run(x):
      images, indices = x['images'], torch.from_numpy(x['sample_indices'])
      model.features_only = True
      features = model(images, indices)
      model.features_only = False  # the pretraining head (pred_mode 'local')
      return {'features': features, 'local_poses': model(images, indices)}
    return model, run

  def fusion():
    model = BertWrapper(_get_bert_encoder(
        implementation='orig', hidden_size=512, intermediate_size=1024, num_attention_heads=8,
        position_embedding_type='relative_key', max_position_embeddings=1024, is_decoder=True,
        add_cross_attention=True, num_hidden_layers=2))
    return model.module, lambda x: {
        'hidden': model(x['local_tokens'], encoder_hidden_states=x['global_tokens'])}

  def stage2_chunked():
    model = local_encoder.cnn_sp_attn(backbone_cfg=dict(name='vidrn18_trck_reg'),
                                      max_subsequence_size=4, features_only=True)

    def run(x):
      chunked = model(x['frames'])
      model.max_subsequence_size = None
      whole = model(x['frames'])
      return {'cls': chunked, 'cls_unchunked': whole}
    return model, run

  def dualtrack_2024():
    model = fusion_model.dualtrack_tus_rec_2024(pretrained=False)
    captured = {}

    def hook(name):
      def fn(module, args, output):
        captured[name] = output
      return fn
    model.local_encoder[0].backbone.register_forward_hook(hook('local_stage2'))
    model.local_encoder[0].register_forward_hook(hook('local_stage3'))
    model.local_encoder.register_forward_hook(hook('local_tokens'))
    model.global_encoder.register_forward_hook(hook('global_tokens'))
    model.fusion_module.register_forward_hook(hook('fusion'))

    def run(x):
      captured.clear()
      poses = model(x['global_images'], x['local_images'])
      trajectory, _ = pose.get_global_and_relative_pred_trackings_from_vectors(
          poses[0].numpy())
      return {**captured, 'poses': poses, 'global_trajectory': trajectory}
    return model, run

  return {
      'cnn3d_large': Block(
          '3D CNN, large temporal window (video_rn18_base), 8 frames of 32x32',
          'src.models.video_resnet.video_rn18_base()', video_cnn(video_resnet.video_rn18_base),
          101, {'frames': ((1, 1, 8, 32, 32), 'uniform', 201)}),
      'cnn3d_small': Block(
          '3D CNN, small temporal window (video_rn18_small_temporal_context), 8 frames of 32x32',
          'src.models.video_resnet.video_rn18_small_temporal_context()',
          video_cnn(video_resnet.video_rn18_small_temporal_context),
          102, {'frames': ((1, 1, 8, 32, 32), 'uniform', 202)}),
      'cnn2d_global': Block(
          'global 2D CNN (video_rn18_no_temporal in VideoResnetWrapperForFeatureMaps), '
          '3 frames of 32x32',
          'src.models.global_encoder.simple_rn_no_temporal_backbone().backbone', global_cnn,
          103, {'frames': ((1, 3, 1, 32, 32), 'uniform', 203)}),
      'vit_stage2': Block(
          'stage-2 ViT (FeatureExtractorWithSpatialSelfAttentionV1.vit) on 4 random 512x16x16 '
          'feature maps, CLS tokens',
          "src.models.local_encoder.FeatureExtractorWithSpatialSelfAttentionV1(nn.Identity(), "
          "features_only=True, input_type='features').vit", vit,
          104, {'feature_maps': ((1, 4, 512, 16, 16), 'uniform', 204)}),
      'temporal_bert': Block(
          'stage-3 temporal BERT (SimpleTemporalAttn, 4 layers, relative key, P=1024) on 40 tokens',
          'src.models.spatio_temporal_attn.SimpleTemporalAttn(features_only=True, '
          'max_position_embeddings=1024).encoder', temporal,
          105, {'tokens': ((1, 40, 64), 'normal', 205)}),
      'global_encoder': Block(
          'global encoder (global_encoder_cnn: 2D CNN, proj, pos_emb, 8-layer BERT) on 4 frames '
          'of 32x32 per sweep, 2 sweeps with different absolute indices; features and the '
          "pretraining head's local poses",
          'src.models.global_encoder.global_encoder_cnn(features_only=True)', global_enc,
          106, {'images': ((2, 4, 1, 32, 32), 'uniform', 206)},
          {'sample_indices': np.array([[0, 16, 32, 48], [3, 200, 777, 1023]], np.int64)}),
      'fusion_bert': Block(
          'fusion BERT (HF BertEncoder, relative key P=1024, cross-attention), 2 of the 12 '
          'layers, 20 local and 3 global tokens',
          "src.models.fusion_model.fusion_model._get_bert_encoder(implementation='orig', "
          "hidden_size=512, intermediate_size=1024, num_attention_heads=8, "
          "position_embedding_type='relative_key', max_position_embeddings=1024, "
          'is_decoder=True, add_cross_attention=True, num_hidden_layers=2)', fusion,
          107, {'local_tokens': ((1, 20, 512), 'normal', 207),
                'global_tokens': ((1, 3, 512), 'normal', 307)}),
      'stage2_chunked': Block(
          'stage 2 (CNN + ViT, cnn_sp_attn on vidrn18_trck_reg) with the 2025 inexact torch.chunk '
          'chunking, max_subsequence_size=4 on 10 frames of 256x256 (chunks 4, 4, 2); also the '
          'unchunked output',
          "src.models.local_encoder.cnn_sp_attn(backbone_cfg=dict(name='vidrn18_trck_reg'), "
          'max_subsequence_size=4, features_only=True)', stage2_chunked,
          108, {'frames': ((1, 10, 1, 256, 256), 'uniform', 208)}),
      'dualtrack_2024': Block(
          'whole DualTrack, TUS-REC 2024 preset, 17 frames (global grid indices 0 and 16); '
          'intermediates of every stage, the (1, 16, 6) poses and their global trajectory',
          'src.models.fusion_model.fusion_model.dualtrack_tus_rec_2024(pretrained=False)',
          dualtrack_2024, 109,
          {'local_images': ((1, 17, 1, 256, 256), 'uniform', 209),
           'global_images': ((1, 17, 1, 224, 224), 'uniform', 309)}),
  }


def _commit(original: str, commit: str | None) -> str:
  if commit:
    return commit
  try:
    return subprocess.run(['git', '-C', original, 'rev-parse', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f'{original} is not a git checkout ({e}); pass --commit=SHA') from e


def _versions(torch) -> dict[str, str]:
  import timm
  import transformers
  return {'python': platform.python_version(), 'torch': torch.__version__,
          'transformers': transformers.__version__, 'timm': timm.__version__,
          'numpy': np.__version__}


_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def record(name: str, block: Block, out_dir: str, common_meta: dict, torch) -> None:
  """Builds, fills, runs and saves one block."""
  module, run = block.build()
  keys_and_shapes = [(k, list(v.shape)) for k, v in module.state_dict().items()]
  state = dualtrack_goldens.random_state_dict(keys_and_shapes, block.weight_seed)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  module.eval()
  random_inputs, meta_inputs = {}, {}
  for input_name, (shape, dist, seed) in block.random_inputs.items():
    array = dualtrack_goldens.random_input(shape, dist, seed)
    random_inputs[input_name] = torch.from_numpy(array)
    meta_inputs[input_name] = {'shape': list(shape), 'dist': dist, 'seed': seed,
                               'sha256': dualtrack_goldens.sha256([array])}
  with torch.no_grad():
    outputs = run({**random_inputs, **block.stored_inputs})
  outputs = {k: np.asarray(v.numpy() if hasattr(v, 'numpy') else v, np.float32)
             for k, v in outputs.items()}
  meta = {
      'block': name, 'description': block.description, 'builder': block.builder,
      **common_meta,
      'weights': {'seed': block.weight_seed, 'keys_and_shapes': keys_and_shapes,
                  'sha256': dualtrack_goldens.sha256(list(state.values())),
                  'num_parameters': int(sum(v.size for k, v in state.items()
                                            if not k.endswith(_BUFFERS)))},
      'random_inputs': meta_inputs,
      'outputs': {k: list(v.shape) for k, v in outputs.items()},
  }
  path = os.path.join(out_dir, name + '.npz')
  dualtrack_goldens.save_golden(path, meta, block.stored_inputs, outputs)
  summary = ', '.join(f'{k} {v.shape} max|.| {np.abs(v).max():.3g}' for k, v in outputs.items())
  print(f'{name}: {os.path.getsize(path) / 1e3:.0f} kB; {summary}', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--original', required=True, help='checkout of ImFusionGmbH/DualTrack')
  parser.add_argument('--out', default=os.path.join(REPO, 'tests', 'fixtures', 'dualtrack'))
  parser.add_argument('--only', default='', help='comma-separated block names (default: all)')
  parser.add_argument('--commit', default=None, help='upstream commit if --original has no .git')
  parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
  args = parser.parse_args()

  original = os.path.abspath(args.original)
  if not os.path.isdir(os.path.join(original, 'src', 'models')):
    raise SystemExit(f'--original={original}: no src/models/ there (not a DualTrack checkout)')
  sys.path.insert(0, original)
  import torch
  from torch import nn
  torch.set_num_threads(args.threads)

  blocks = _blocks(torch, nn)
  names = [n for n in args.only.split(',') if n] or list(blocks)
  unknown = sorted(set(names) - set(blocks))
  if unknown:
    raise SystemExit(f'--only: unknown blocks {unknown}; known: {sorted(blocks)}')
  common_meta = {'upstream': 'https://github.com/ImFusionGmbH/DualTrack',
                 'upstream_commit': _commit(original, args.commit),
                 'versions': _versions(torch),
                 'recorded_with': 'scripts/record_dualtrack_goldens.py'}
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    record(name, blocks[name], args.out, common_meta, torch)


if __name__ == '__main__':
  main()
