r"""Baseline: DCLNet (Guo et al. 2020; DualTrack scripts/baselines/train_dcnet.py + dcnet.yaml).

dcnet.yaml: 5-frame clips, batch 50, 4000 epochs, Adam lr 1e-4 without weight decay, a per-step
cosine schedule, no gradient clipping (the YAML's clip_grad 3 is never applied), no correlation
loss, validation every 50 epochs with the best model chosen on the 5-point local displacement
error; 224 x 224 crops, no augmentation. Model and test: dualtrack_jax/experiments/
baseline_dclnet.py.

  python -m launch.train --config=configs/dualtrack/baseline_dclnet.py \
      --workdir=workdirs/baseline_dclnet

On simulated sweeps, in minutes on two CPU cores (`:sim`, a narrow ResNeXt):

  python -m launch.train --config=configs/dualtrack/baseline_dclnet.py:sim \
      --workdir=workdirs/baseline_dclnet_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/baseline_dclnet.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'dualtrack_jax.experiments.baseline_dclnet'
  c.seed = 0

  c.data = mlc.ConfigDict()
  c.data.dataset = 'tus-rec'  # A name in the dataset registry, a registry CSV, or 'synthetic'.
  c.data.registry = ''
  c.data.window = 5  # `window_size`.
  c.data.crop = (224, 224)
  # /255, then the dataset's pixel statistics (DATASET_INFO pixel_mean/pixel_std).
  c.data.pixel_mean = 0.0
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
  c.model.layers = (3, 4, 6, 3)
  c.model.widths = (128, 256, 512, 1024)
  c.model.cardinality = 32
  c.model.stem_width = 64
  c.compute_dtype = 'float32'
  c.correlation_weight = 0.0  # `use_corr_loss: false`; 1.0 adds (1 - Pearson correlation).

  c.batch_size = 50
  c.num_workers = 8
  c.num_epochs = 4000
  c.total_steps = mlc.config_dict.placeholder(int)
  c.warmup_epochs = 0
  c.optim = mlc.ConfigDict()
  c.optim.schedule = 'cosine'
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = mlc.config_dict.placeholder(float)
  c.frozen = ()

  c.eval_every_epochs = 50  # `check_val_every_n_epoch`.
  c.eval_batch_size = 8  # `inference_batch_size`: clips per inference batch.
  c.plot_outline_every = 0
  # All-pixel DDF errors and, for sweep files with landmarks, the TUS-REC GPE/GLE/LPE/LLE in every
  # evaluation (the original's --include_full_ddf_metrics; costly at 480x640 over long sweeps).
  c.eval_full_ddf = True
  c.best_metric = 'ddf/5pt-avg_local_displacement_error'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100

  if variant == 'sim':
    c.data.dataset = 'synthetic'
    c.data.crop = (48, 48)
    c.num_workers = 0
    c.model.layers = (1, 1, 1, 1)
    c.model.widths = (32, 32, 64, 64)
    c.model.cardinality = 8
    c.model.stem_width = 16
    c.batch_size = 8
    c.num_epochs = 160  # 480 steps.
    c.optim.lr = 1e-3
    c.eval_every_epochs = 80
    c.eval_batch_size = 32
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
