r"""DualTrack local encoder, stage 3: the relative-key temporal BERT on the frozen CNN + ViT.

The original recipe (`configs/dualtrack_train_tus_rec/local_encoder/stage3.yaml`):
`dualtrack_loc_enc_stg3_legacy`, the stage-2 model frozen, the temporal BERT and `temporal_fc`
trained on whole sweeps (batch 1) with the loader's default augmentations. All stages:
docs/dualtrack.md, section "Training recipes".

  python -m launch.train --config=configs/dualtrack/local_stage3.py \
      --config.init_from.stage2.workdir=workdirs/local_stage2 --workdir=workdirs/local_stage3

`feature_cache.enabled`: train on the frozen CNN + ViT features of each sweep, computed once (the
original's legacy recipe, `export_features`); ~100x cheaper epochs. Cached features are those of
the centre-cropped, unaugmented sweep, so this needs `data.augment = None` (refused otherwise):
  --config.feature_cache.enabled=True --config.data.augment=None
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original stage-3 recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/local_stage3.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'local_stage2.py:{variant}'))
  c.experiment = 'dualtrack_jax.experiments.local_stage3'
  del c.data['window']  # Whole sweeps.
  c.model.update(stage=3, frozen='cnn+vit', temporal_layers=4, temporal_heads=4,
                 temporal_intermediate=32, dropout=0.1,
                 # The YAML sets 4096, but the fusion model it feeds has 1024, and the original's
                 # loader then silently re-initialises the tables; 1024 keeps them.
                 max_positions=1024)
  c.frozen = ('cnn/.*', 'vit/.*', 'vit_fc/.*')  # The whole stage-2 model (outer frozen wrapper).
  c.init_from = mlc.ConfigDict()
  c.init_from.stage2 = mlc.ConfigDict(dict(workdir='', checkpoint='best', map=[('', '')],
                                           reinit=[]))
  c.feature_cache = mlc.ConfigDict(dict(
      enabled=False, source='stage2', prefix='',
      directory=''))  # '': $DUALTRACK_CACHE/features, else ~/.cache/dualtrack_jax/features.
  c.batch_size = 1
  c.num_epochs = 500
  c.warmup_epochs = 0
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.eval_every_epochs = 10
  if variant == 'sim':
    c.model.update(temporal_layers=2, temporal_heads=2, max_positions=256)
    c.feature_cache.enabled = True  # The legacy recipe, and 10x faster on a CPU.
    c.data.augment = None
    c.num_epochs = 8
    c.eval_every_epochs = 8
  return c
