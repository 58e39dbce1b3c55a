r"""DualTrack fusion training: the whole model from the global and stage-3 local encoders.

The original recipe (`configs/dualtrack_train_tus_rec/dualtrack.yaml`):
`dualtrack_fusion_model`, the global encoder from its pretraining (fully trainable, BN in training
mode), the local encoder from stage 3 (CNN + ViT frozen, temporal BERT trainable), projection,
fusion BERT and head from scratch (torch default init); whole sweeps, batch 1, no augmentation;
global images from the stored `images_downsampled-224` (50-px border crop) with Normalize(0.5,
0.25); local centre crops of 256. All stages: docs/dualtrack.md, section "Training recipes".

  python -m launch.train --config=configs/dualtrack/fusion.py \
      --config.init_from.global_encoder.workdir=workdirs/global \
      --config.init_from.local.workdir=workdirs/local_stage3 --workdir=workdirs/fusion

Checkpoints converted from the original (`launch.convert`) carry this config with the released
model's settings (global images: full frame resized, raw [0, 1], as every evaluation config).
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original fusion recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/fusion.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'local_stage1.py:{variant}'))
  c.experiment = 'dualtrack_jax.experiments.fusion'
  del c.data['window']
  c.data.augment = None
  c.data.global_source = 'downsampled'
  c.data.global_normalize = (0.5, 0.25)  # As the original; its evaluation configs use (0, 1).
  # dualtrack.DualTrack keyword arguments: the TUS-REC 2024 model.
  c.model = mlc.ConfigDict(dict(
      max_positions=1024, grid_spacing=16, hidden=512, fusion_layers=12, fusion_heads=8,
      dropout=0.1, local_cnn_widths=(64, 128, 256, 512), local_cnn_stem_width=45,
      local_cnn_temporal_kernels=(3, 3, 3, 3), cnn_chunking=None, max_subsequence=None,
      vit_feature_map_size=16, vit_patch_size=2, vit_layers=4, vit_heads=4, vit_intermediate=32,
      local_hidden=64, temporal_layers=4, temporal_heads=4, temporal_intermediate=32,
      local_frozen='cnn+vit', global_cnn_widths=(64, 128, 256, 512), global_cnn_stem_width=45,
      global_layers=8, global_heads=8, global_frozen_backbone=False,
      # Same results, other kernels (docs/performance.md): 'einsum' | 'xla' | 'cudnn' (GPU), and
      # 'frame_conv' | 'native'.
      attention_implementation='einsum', conv3d_implementation='frame_conv'))
  c.frozen = ('local_encoder/(cnn|vit|vit_fc)/.*',)
  c.init_from = mlc.ConfigDict()
  c.init_from.global_encoder = mlc.ConfigDict(dict(
      workdir='', checkpoint='best', map=[('', 'global_encoder')], reinit=[]))
  c.init_from.local = mlc.ConfigDict(dict(
      workdir='', checkpoint='best', map=[('', 'local_encoder')], reinit=[]))
  # Train on the frozen CNN + ViT features of each sweep, computed once: exact for this recipe
  # (no augmentation, CNN + ViT frozen in eval mode), with the same loss and gradients as on the
  # images, without running the 3D CNN every epoch. Needs data.augment = None.
  c.feature_cache = mlc.ConfigDict(dict(
      enabled=True, source='local', prefix='',  # init_from.local holds the stage-3 encoder.
      directory=''))  # '': $DUALTRACK_CACHE/features, else ~/.cache/dualtrack_jax/features.
  c.batch_size = 1
  c.num_epochs = 500  # The legacy script's default was 800.
  c.warmup_epochs = 10
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.eval_every_epochs = 10
  if variant == 'sim':
    c.data.global_source = 'resize'  # Simulated sweeps store no 'images_downsampled-224'.
    c.model.update(
        max_positions=256, hidden=32, fusion_layers=2, fusion_heads=2,
        local_cnn_widths=(16, 32, 64, 128), local_cnn_stem_width=12,
        local_cnn_temporal_kernels=(3, 1, 1, 1), vit_feature_map_size=c.data.crop[0] // 16,
        vit_patch_size=1, temporal_layers=2, temporal_heads=2, global_cnn_widths=(8, 16, 32, 64),
        global_cnn_stem_width=8, global_layers=2, global_heads=2)
    c.num_epochs = 8
    c.warmup_epochs = 1
    c.eval_every_epochs = 8
  return c
