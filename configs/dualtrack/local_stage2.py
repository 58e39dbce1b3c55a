r"""DualTrack local encoder, stage 2: a per-frame ViT on the frozen stage-1 CNN.

The original recipe (`configs/dualtrack_train_tus_rec/local_encoder/stage2.yaml`):
`dualtrack_loc_enc_stg2`, the stage-1 CNN frozen (eval-mode BN, no gradient), the ViT and its
head `vit_fc` trained on random 16-frame windows with the stage-1 augmentations. All stages:
docs/dualtrack.md, section "Training recipes".

  python -m launch.train --config=configs/dualtrack/local_stage2.py \
      --config.init_from.stage1.workdir=workdirs/local_stage1 --workdir=workdirs/local_stage2

Small variant on simulated sweeps (after `local_stage1.py:sim`):

  python -m launch.train --config=configs/dualtrack/local_stage2.py:sim \
      --config.init_from.stage1.workdir=workdirs/local_stage1_sim \
      --workdir=workdirs/local_stage2_sim
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original stage-2 recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/local_stage2.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'local_stage1.py:{variant}'))
  c.experiment = 'dualtrack_jax.experiments.local_stage2'
  # dualtrack.LocalEncoder keyword arguments; the CNN must equal stage 1's.
  c.model = mlc.ConfigDict(dict(
      stage=2, cnn_widths=(64, 128, 256, 512), cnn_stem_width=45,
      cnn_temporal_kernels=(3, 3, 3, 3),  # The released models' CNN; the YAML's is small-window.
      vit_feature_map_size=16, vit_patch_size=2, vit_layers=4, vit_heads=4, vit_intermediate=32,
      hidden=64, frozen='cnn',
      # Same results, other kernels (docs/performance.md): 'einsum' | 'xla' | 'cudnn' (GPU), and
      # 'frame_conv' | 'native'.
      attention_implementation='einsum', conv3d_implementation='frame_conv'))
  c.frozen = ('cnn/.*',)  # No optimiser update; the model keeps the CNN's BN in eval mode.
  c.init_from = mlc.ConfigDict()
  c.init_from.stage1 = mlc.ConfigDict(dict(
      workdir='', checkpoint='best', map=[('backbone', 'cnn')], reinit=[]))
  # `data.batch_size: 16` (the legacy README trained with batch 1 on whole sweeps).
  c.batch_size = 16
  c.num_epochs = 500
  c.warmup_epochs = 0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.eval_every_epochs = 10
  if variant == 'sim':
    c.model.update(cnn_widths=(16, 32, 64, 128), cnn_stem_width=12,
                   cnn_temporal_kernels=(3, 1, 1, 1),  # The stage-1 sim CNN.
                   # 48 x 48 crops: a 3 x 3 CNN map, one ViT patch per position.
                   vit_feature_map_size=c.data.crop[0] // 16, vit_patch_size=1)
    c.batch_size = 8
    c.num_epochs = 16
    c.eval_every_epochs = 16
  return c
