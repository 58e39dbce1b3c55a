r"""Baseline: MoNet image-only (Luo et al. 2023; DualTrack scripts/baselines/run_monet_baseline.py).

The README's command (`run_monet_baseline.py --epochs=3000`) with the script's defaults: random
64-frame windows, one per sweep per epoch, 256 x 256 centre crops (no random crop), no
augmentation (`--use_augmentations` would add flips and reversal), batch 4, AdamW lr 1e-4 without
weight decay, the original's warmup-cosine schedule with 10 warmup epochs, validation every 10
epochs; loss MSE + (1 - Pearson correlation). Model and test: dualtrack_jax/experiments/
baseline_monet.py.

  python -m launch.train --config=configs/dualtrack/baseline_monet.py \
      --workdir=workdirs/baseline_monet

On simulated sweeps, in minutes on two CPU cores (`:sim`):

  python -m launch.train --config=configs/dualtrack/baseline_monet.py:sim \
      --workdir=workdirs/baseline_monet_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/baseline_monet.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'dualtrack_jax.experiments.baseline_monet'
  c.seed = 0

  c.data = mlc.ConfigDict()
  c.data.dataset = 'tus-rec'  # A name in the dataset registry, a registry CSV, or 'synthetic'.
  c.data.registry = ''
  c.data.window = 64  # `--subsequence_length_train`.
  c.data.crop = (256, 256)  # `--crop_size`, a centre crop in training too.
  c.data.pixel_mean = 0.0  # The script feeds frames / 255.
  c.data.pixel_std = 1.0
  # `--use_augmentations`: dict(flip_p=0.5, reverse_p=0.5, random_crop=False).
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
  c.model.lstm_hidden = 256
  c.model.lstm_layers = 4
  c.compute_dtype = 'float32'
  c.correlation_weight = 1.0  # loss = MSE + weight * (1 - Pearson correlation).

  c.batch_size = 4
  c.num_workers = 4
  c.num_epochs = 3000
  c.total_steps = mlc.config_dict.placeholder(int)
  c.warmup_epochs = 10
  c.optim = mlc.ConfigDict()
  c.optim.schedule = 'warmup_cosine'
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = mlc.config_dict.placeholder(float)
  c.frozen = ()

  c.eval_every_epochs = 10  # `--val_every`.
  c.eval_tile = 128  # Frames per CNN tile of whole-sweep inference (exact; memory bound).
  c.plot_outline_every = 0
  # All-pixel DDF errors and, for sweep files with landmarks, the TUS-REC GPE/GLE/LPE/LLE in every
  # evaluation (the original's --include_full_ddf_metrics; costly at 480x640 over long sweeps).
  c.eval_full_ddf = True
  c.best_metric = 'ddf/5pt-avg_global_displacement_error'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100

  if variant == 'sim':
    c.data.dataset = 'synthetic'
    c.data.window = 16
    c.data.crop = (48, 48)
    c.num_workers = 0
    c.model.widths = (16, 32, 64, 128)
    c.model.stem_width = 12
    c.model.lstm_hidden = 64
    c.model.lstm_layers = 2
    c.batch_size = 8
    c.num_epochs = 160  # 480 steps.
    c.warmup_epochs = 2
    c.optim.lr = 1e-3
    c.eval_every_epochs = 80
    c.eval_tile = 64
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
