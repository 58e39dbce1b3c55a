r"""DualTrack finetuning for TUS-REC 2025 (the original's `configs/tus_rec_challenge_2025/`).

arg: 'stg0', 'stg1' or 'stg2', optionally with ':sim' (e.g. 'stg0:sim').
- stg0: the 2024 model with every position table enlarged to 4096 (global `pos_emb`, the 4
  temporal and 12 fusion relative-key tables, 17 tensors); the original loads the 2024 weights
  with `handle_size_mismatch`, i.e. re-initialises those 17 randomly: here an explicit
  `init_from.tus_rec_2024.reinit` list. TUS-REC 2024 data, no augmentation, global full-frame
  resize in [0, 1]; the CNN runs with the original's inexact torch.chunk chunking (1024).
- stg1: from stg0; 2025 data with reverse, 90 % subsampling, flip and random 256 crops; global
  from the stored `images_downsampled-224`.
- stg2: from stg1; "thaw the CNN" (`freeze_backbone: false`), which in the original only unfreezes
  the ViT (the CNN stays frozen through the inner stage-2 wrapper): reproduced, the ViT
  trains and the CNN does not; chunks of 512 frames.
The original steps in full: docs/dualtrack.md, section "TUS-REC 2025 finetuning".

  python -m launch.train --config=configs/dualtrack/finetune_2025.py:stg0 \
      --config.init_from.tus_rec_2024.workdir=workdirs/dualtrack_2024 --workdir=workdirs/ft_stg0
"""
import os

import ml_collections as mlc

from launch import config_utils


def position_tables(temporal_layers: int, fusion_layers: int) -> list[str]:
  """The parameter paths of every position table of DualTrack (17 in the released model)."""
  return (['global_encoder/pos_emb']
          + [f'local_encoder/temporal/layer_{i}/attention/distance_embedding'
             for i in range(temporal_layers)]
          + [f'fusion/layer_{i}/attention/distance_embedding' for i in range(fusion_layers)])


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Finetuning step 'stg0' | 'stg1' | 'stg2', with ':sim' for the simulated small variant."""
  step, _, variant = (arg or '').partition(':')
  variant = variant or 'full'
  if step not in ('stg0', 'stg1', 'stg2') or variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/finetune_2025.py: unknown arg {arg!r}; use stg0, stg1 '
                     'or stg2, optionally followed by ":sim"')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'fusion.py:{variant}'))
  sim = variant == 'sim'
  c.model.update(max_positions=512 if sim else 4096, cnn_chunking='torch_chunk',
                 max_subsequence=64 if sim else 1024)
  c.data.global_normalize = (0.0, 1.0)  # Every 2025 config: mean 0 / std 1.
  c.warmup_epochs = 1
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.init_from = mlc.ConfigDict()
  if step == 'stg0':
    c.data.dataset = c.data.dataset if sim else 'tus-rec'
    c.data.global_source = 'resize'
    c.data.augment = None
    c.init_from.tus_rec_2024 = mlc.ConfigDict(dict(
        workdir='', checkpoint='best', map=[('', '')],
        reinit=position_tables(c.model.temporal_layers, c.model.fusion_layers)))
    c.feature_cache.update(source='tus_rec_2024', prefix='local_encoder')
    c.num_epochs = 20
    c.eval_every_epochs = 1
  else:
    # 'tus-rec-2025-full-train' / 'tus-rec-2025-val' in the original: one registered dataset
    # with train and val splits here.
    c.data.dataset = c.data.dataset if sim else 'tus-rec-2025'
    c.data.global_source = 'resize' if sim else 'downsampled'
    c.data.augment = mlc.ConfigDict(dict(flip_p=0.5, reverse_p=0.5, subsample_p=0.5,
                                         keep_fraction=0.9, random_crop=True))
    c.feature_cache.enabled = False  # Augmented images (and a trainable ViT in stg2).
    previous = 'stg0' if step == 'stg1' else 'stg1'
    c.init_from[previous] = mlc.ConfigDict(dict(workdir='', checkpoint='best', map=[('', '')],
                                                reinit=[]))
    c.num_epochs = 200  # DDP on 4 GPUs in the original (batch 1 per GPU).
    c.eval_every_epochs = 1
  if step == 'stg2':
    c.model.update(local_frozen='cnn', max_subsequence=32 if sim else 512)
    c.frozen = ('local_encoder/cnn/.*',)
  if sim:
    c.num_epochs = 4
    c.eval_every_epochs = 4
  return c
