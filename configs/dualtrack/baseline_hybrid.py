r"""Baseline: the hybrid transformer of Ning et al. 2022 (DualTrack run_ning_et_al_reprod.py).

End to end, the README's first command (`run_ning_et_al_reprod.py --hidden_size=128`) with the
script's defaults: whole sweeps (batch 1), 256 x 256 centre crops, AdamW lr 1e-4 without weight
decay, the original's warmup-cosine schedule with 10 warmup epochs, 500 epochs, validation every
10; 12-layer BERT, 8 heads, hidden 128, 1024 positions. Model and recipes:
dualtrack_jax/experiments/baseline_hybrid.py.

  python -m launch.train --config=configs/dualtrack/baseline_hybrid.py \
      --workdir=workdirs/baseline_hybrid

Two-stage (`:two_stage`, the README's recommended recipe): first the causal small-window CNN as a
stage-1 local encoder (the README: 5000 epochs, lr 1e-4, weight decay 1e-3, batch 16, 16-frame
windows, augmentations), then the transformer on the frozen CNN's features, computed once per
training sweep into the feature cache (`feature_cache.enabled`; `feature_cache.directory` '' is
$DUALTRACK_CACHE/features, else ~/.cache/dualtrack_jax/features):

  python -m launch.train --config=configs/dualtrack/local_stage1.py \
      --config.model.causal=True --config.model.temporal_kernels='(3, 1, 1, 1)' \
      --config.batch_size=16 --workdir=workdirs/baseline_hybrid_cnn
  python -m launch.train --config=configs/dualtrack/baseline_hybrid.py:two_stage \
      --config.init_from.cnn.workdir=workdirs/baseline_hybrid_cnn \
      --workdir=workdirs/baseline_hybrid_two_stage

On simulated sweeps, in minutes on two CPU cores (`:sim`, end to end, a narrow CNN):

  python -m launch.train --config=configs/dualtrack/baseline_hybrid.py:sim \
      --workdir=workdirs/baseline_hybrid_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """End to end ('full'), two-stage ('two_stage') or the small variant on simulated sweeps."""
  variant = arg or 'full'
  if variant not in ('full', 'two_stage', 'sim'):
    raise ValueError(f'configs/dualtrack/baseline_hybrid.py: unknown variant {variant!r}; '
                     'use "full", "two_stage" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'dualtrack_jax.experiments.baseline_hybrid'
  c.seed = 42  # The script's --seed default.

  c.data = mlc.ConfigDict()
  c.data.dataset = 'tus-rec'  # A name in the dataset registry, a registry CSV, or 'synthetic'.
  c.data.registry = ''
  c.data.crop = (256, 256)
  c.data.pixel_mean = 0.0  # The script feeds frames / 255.
  c.data.pixel_std = 1.0
  c.data.augment = None
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.num_train = 24
  c.data.synthetic.num_val = 6
  c.data.synthetic.seed = 0
  c.data.synthetic.cache_dir = ''
  c.data.synthetic.simulator = mlc.ConfigDict(
      dict(height=96, width=128, pixel_spacing_mm=(0.3, 0.3), num_frames=(100, 200)))

  c.model = mlc.ConfigDict()
  c.model.widths = (64, 128, 256, 512)
  c.model.stem_width = 45
  c.model.hidden = 128  # README `--hidden_size=128` (the script's default is 512).
  c.model.num_layers = 12
  c.model.num_heads = 8
  c.model.max_positions = 1024
  c.model.dropout = 0.1
  c.compute_dtype = 'float32'
  c.cnn_frozen = False
  # Two-stage only: the frozen CNN (`init_from.cnn`, its `backbone`) gives cached features.
  c.feature_cache = mlc.ConfigDict(dict(enabled=False, source='cnn', prefix='backbone',
                                        directory=''))

  c.batch_size = 1
  c.num_workers = 4
  c.num_epochs = 500
  c.total_steps = mlc.config_dict.placeholder(int)
  c.warmup_epochs = 10
  c.optim = mlc.ConfigDict()
  c.optim.schedule = 'warmup_cosine'
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = mlc.config_dict.placeholder(float)  # `--clip_grad_norm` default.
  c.frozen = ()

  c.eval_every_epochs = 10  # `--val_every`.
  c.eval_tile = 128
  c.plot_outline_every = 0
  # All-pixel DDF errors and, for sweep files with landmarks, the TUS-REC GPE/GLE/LPE/LLE in every
  # evaluation (the original's --include_full_ddf_metrics; costly at 480x640 over long sweeps).
  c.eval_full_ddf = True
  c.best_metric = 'ddf/5pt-avg_global_displacement_error'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100

  if variant == 'two_stage':
    # The stage-1 run's `backbone` (LocalEncoderStage1) is this model's `backbone`; frozen.
    c.init_from = mlc.ConfigDict()
    c.init_from.cnn = mlc.ConfigDict(dict(workdir='', checkpoint='best',
                                          map=[('backbone', 'backbone')], reinit=[]))
    c.cnn_frozen = True
    c.frozen = ('backbone/.*',)
    c.feature_cache.enabled = True
  if variant == 'sim':
    c.data.dataset = 'synthetic'
    c.data.crop = (48, 48)
    c.num_workers = 0
    c.model.widths = (16, 32, 64, 128)
    c.model.stem_width = 12
    c.model.hidden = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.max_positions = 256
    c.num_epochs = 20  # 480 steps of one sweep.
    c.warmup_epochs = 1
    c.optim.lr = 1e-3
    c.eval_every_epochs = 10
    c.eval_tile = 64
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
