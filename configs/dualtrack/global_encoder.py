r"""DualTrack global-encoder pretraining: 2D ResNet-18 + BERT over sparse frames of a sweep.

The original recipe (`configs/dualtrack_train_tus_rec/global_encoder/cnn.yaml`):
`global_encoder_cnn` with `pred_mode="local"` (motion between consecutive sampled frames), 64
sorted random frames per sweep, full frames resized to 224 x 224 and normalised with mean 0.5 /
std 0.25, flips and reversals, batch 4, everything trainable. All stages: docs/dualtrack.md,
section "Training recipes".

  python -m launch.train --config=configs/dualtrack/global_encoder.py --workdir=workdirs/global
  python -m launch.train --config=configs/dualtrack/global_encoder.py:sim \
      --workdir=workdirs/global_sim
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original global pretraining recipe, or its small variant with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/global_encoder.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'local_stage1.py:{variant}'))
  c.experiment = 'dualtrack_jax.experiments.global_encoder'
  del c.data['window']
  c.data.num_samples = 64  # RandomSparseSampleTemporal, also at validation in the original.
  c.data.global_source = 'resize'  # Full frame -> 224 x 224 (antialiased bilinear).
  # Normalize(0.5, 0.25) in pretraining; every evaluation config of the original uses raw [0, 1]
  # (inconsistent in the original, reproduced as is; see docs/dualtrack.md, section
  # "Inconsistencies and bugs of the original code").
  c.data.global_normalize = (0.5, 0.25)
  c.data.grid_spacing = 16  # Validation: the fusion model's regular grid.
  c.data.augment = mlc.ConfigDict(dict(flip_p=0.5, reverse_p=0.5, random_crop=False))
  # GlobalEncoder keyword arguments (the BERT's feed-forward width is 2 * hidden).
  c.model = mlc.ConfigDict(dict(cnn_widths=(64, 128, 256, 512), cnn_stem_width=45, hidden=512,
                                num_layers=8, num_heads=8, max_positions=1024, dropout=0.1,
                                # 'einsum' | 'xla' | 'cudnn' (GPU): docs/performance.md.
                                attention_implementation='einsum'))
  c.frozen = ()
  c.batch_size = 4  # The loader default.
  c.num_epochs = 5000
  c.warmup_epochs = 0
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-3
  c.eval_every_epochs = 100
  if variant == 'sim':
    c.data.num_samples = 16
    c.model.update(cnn_widths=(8, 16, 32, 64), cnn_stem_width=8, hidden=32, num_layers=2,
                   num_heads=2, max_positions=256)
    c.batch_size = 8
    c.num_epochs = 16
    c.eval_every_epochs = 16
  return c
