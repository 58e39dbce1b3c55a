r"""Baseline: the 2-frame CNN of Prevost et al. 2018 (DualTrack's train_2_frame_cnn.py).

The README's command (`--model efficientnet_b1 --epochs 6700 --batch_size 16 --optimizer adam
--scheduler none --epoch_mode tus_rec --flip_h_prob .5 --reverse_sweep_prob .5 --skip_frame_prob
.2 --validate_every 100`) with the Prevost ConvNet (`--model prevostnet`), the one backbone built
here so far: one random pair per sweep per epoch, Adam lr 1e-4 without decay or schedule, the
script's default gradient clipping at 3 and dropout 0.25. The network's input is 128 x 128 in the
original (its `input_size`); here a 128 x 128 crop. Details and departures:
dualtrack_jax/experiments/baseline_two_frame.py.

  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py \
      --workdir=workdirs/baseline_two_frame

On simulated sweeps, in minutes on two CPU cores (`:sim`):

  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py:sim \
      --workdir=workdirs/baseline_two_frame_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The original recipe, or its small variant on simulated sweeps with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/dualtrack/baseline_two_frame.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'dualtrack_jax.experiments.baseline_two_frame'
  c.seed = 0

  c.data = mlc.ConfigDict()
  c.data.dataset = 'tus-rec'  # A name in the dataset registry, a registry CSV, or 'synthetic'.
  c.data.registry = ''
  c.data.crop = (128, 128)
  # /255, then the dataset's pixel statistics (the script's DATASET_INFO pixel_mean/pixel_std).
  c.data.pixel_mean = 0.0
  c.data.pixel_std = 1.0
  c.data.augment = mlc.ConfigDict(dict(flip_p=0.5, reverse_p=0.5, random_crop=True))
  c.data.skip_frame_p = 0.2  # `--skip_frame_prob`: the pair is frames j and j + 2.
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.num_train = 24
  c.data.synthetic.num_val = 6
  c.data.synthetic.seed = 0
  c.data.synthetic.cache_dir = ''
  c.data.synthetic.simulator = mlc.ConfigDict(
      dict(height=96, width=128, pixel_spacing_mm=(0.3, 0.3), num_frames=(100, 200)))

  c.model = mlc.ConfigDict()
  c.model.backbone = 'prevost'  # `--model prevostnet`.
  c.model.norm = mlc.config_dict.placeholder(str)  # 'batch': `prevostnet_bn`.
  c.model.dropout = 0.25
  c.compute_dtype = 'float32'

  c.batch_size = 16
  c.num_workers = 4
  c.num_epochs = 6700
  c.total_steps = mlc.config_dict.placeholder(int)
  c.warmup_epochs = 0
  c.optim = mlc.ConfigDict()
  c.optim.schedule = 'constant'  # `--scheduler none`.
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0  # `--optimizer adam`, no decay: AdamW with wd 0 is Adam.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 3.0  # `--clip_grad` default; the script's loop applies it.
  c.frozen = ()
  # Multiplies each pose component's squared error [tx, ty, tz, rx, ry, rz]; all ones is the
  # original's plain MSE.
  c.loss_weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

  c.eval_every_epochs = 100  # `--validate_every`.
  c.eval_batch_size = 64  # Pairs per inference batch over a whole sweep.
  c.plot_outline_every = 0
  c.best_metric = 'ddf/5pt-avg_global_displacement_error'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100

  if variant == 'sim':
    c.data.dataset = 'synthetic'
    c.data.crop = (64, 64)
    # Simulated sweeps all move forward in z; decorrelation cannot tell the direction.
    c.data.augment.reverse_p = 0.0
    c.num_workers = 0
    c.batch_size = 16
    # As local_stage1.py:sim: per frame only tz is large enough to learn from 64x64 crops; equal
    # weights let the sub-pixel in-plane motions' noise hide the decorrelation cue.
    c.loss_weights = (0.01, 0.01, 1.0, 0.01, 0.01, 0.01)
    c.num_epochs = 400  # 400 steps: 24 sweeps give one batch of 16 pairs per epoch.
    c.optim.lr = 1e-3
    c.eval_every_epochs = 200
    c.eval_batch_size = 32
    c.checkpoint_every_steps = 200
    c.log_every_steps = 50
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
