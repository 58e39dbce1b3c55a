r"""Baseline: the 2-frame CNN of Prevost et al. 2018 (DualTrack's train_2_frame_cnn.py).

The README's command (`--model efficientnet_b1 --epochs 6700 --batch_size 16 --optimizer adam
--scheduler none --epoch_mode tus_rec --flip_h_prob .5 --reverse_sweep_prob .5 --skip_frame_prob
.2 --validate_every 100`): timm's EfficientNet-B1 on two stacked frames, one random pair per sweep
per epoch, Adam lr 1e-4 without decay or schedule, the script's default gradient clipping at 3 and
dropout 0.25. The script resizes frames to its `--resize_to` (none in the README command); here a
128 x 128 crop, the Prevost ConvNet's input size. `--config.model.backbone=resnet10t` is the
script's default `--model resnet10`, `prevost` its `--model prevostnet` (`model.norm='batch'`:
`prevostnet_bn`). Details and departures: dualtrack_jax/experiments/baseline_two_frame.py.

  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py \
      --workdir=workdirs/baseline_two_frame

The TUS-REC challenge baseline (`:challenge`; QiLi111/tus-rec-challenge_baseline, train.py):
EfficientNet-B1 on a consecutive frame pair of the full 480 x 640 frame, frames / 255, no
augmentation, Adam lr 1e-4, batch 16, and the loss on the image corners mapped by the predicted
and the true transform (`loss='points'`); torchvision's B1 as it builds it: dropout 0.2 and
stochastic depth 0.2. Its training runs "forever" (1e6 epochs) and validates every epoch; here
6700 epochs as the README command and validation every 100.

  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py:challenge \
      --workdir=workdirs/baseline_two_frame_challenge

On simulated sweeps, in minutes on two CPU cores: the Prevost ConvNet (`:sim`) or the
challenge's EfficientNet-B1 with the point loss (`:challenge_sim`):

  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py:sim \
      --workdir=workdirs/baseline_two_frame_sim
  python -m launch.train --config=configs/dualtrack/baseline_two_frame.py:challenge_sim \
      --workdir=workdirs/baseline_two_frame_challenge_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The README recipe ('full'), the challenge's ('challenge'), or small ones ('sim',
  'challenge_sim') on simulated sweeps."""
  variant = arg or 'full'
  variants = ('full', 'sim', 'challenge', 'challenge_sim')
  if variant not in variants:
    raise ValueError(f'configs/dualtrack/baseline_two_frame.py: unknown variant {variant!r}; '
                     f'use one of {", ".join(variants)}.')
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
  # `--optical_flow`: the pair's Farneback flow as two more input channels (the script's authors
  # "did not observe any benefit of it when using larger CNNs").
  c.data.optical_flow = False
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.num_train = 24
  c.data.synthetic.num_val = 6
  c.data.synthetic.seed = 0
  c.data.synthetic.cache_dir = ''
  c.data.synthetic.simulator = mlc.ConfigDict(
      dict(height=96, width=128, pixel_spacing_mm=(0.3, 0.3), num_frames=(100, 200)))

  c.model = mlc.ConfigDict()
  c.model.backbone = 'efficientnet_b1'  # 'prevost' | 'resnet10t' | 'efficientnet_b1'.
  c.model.norm = mlc.config_dict.placeholder(str)  # prevost only; 'batch': `prevostnet_bn`.
  c.model.dropout = 0.25  # `--dropout`: timm's drop_rate, or the Prevost ConvNet's dropout.
  c.model.drop_path = 0.0  # efficientnet_b1 only: stochastic depth of the last block.
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
  c.loss = 'pose'  # 'pose': MSE of the pose vector; 'points': the TUS-REC baseline's corner MSE.
  # loss='pose' only: multiplies each pose component's squared error [tx, ty, tz, rx, ry, rz];
  # all ones is the original's plain MSE.
  c.loss_weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

  c.eval_every_epochs = 100  # `--validate_every`.
  c.eval_batch_size = 64  # Pairs per inference batch over a whole sweep.
  c.plot_outline_every = 0
  # All-pixel DDF errors and, for sweep files with landmarks, the TUS-REC GPE/GLE/LPE/LLE in every
  # evaluation (the original's --include_full_ddf_metrics; costly at 480x640 over long sweeps).
  c.eval_full_ddf = True
  c.best_metric = 'ddf/5pt-avg_global_displacement_error'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100

  if variant.startswith('challenge'):
    c.data.crop = (480, 640)  # The whole TUS-REC frame.
    c.data.augment = None
    c.data.skip_frame_p = 0.0  # Its SAMPLE_RANGE=2: consecutive frames.
    c.model.dropout = 0.2  # torchvision efficientnet_b1's classifier dropout.
    c.model.drop_path = 0.2  # and its stochastic depth (stochastic_depth_prob).
    c.loss = 'points'
    c.optim.grad_clip_norm = mlc.config_dict.placeholder(float)  # Its loop does not clip.
  if variant.endswith('sim'):
    c.data.dataset = 'synthetic'
    c.data.crop = (64, 64)
    # Simulated sweeps all move forward in z; decorrelation cannot tell the direction.
    if c.data.augment is not None:
      c.data.augment.reverse_p = 0.0
    c.model.backbone = 'efficientnet_b1' if variant == 'challenge_sim' else 'prevost'
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
