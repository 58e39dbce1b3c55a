r"""I-JEPA pretraining of SONICHU's ViT-B/16 backbone at 256x256 (docs/ijepa.md).

The recipe of the I-JEPA paper (arXiv 2301.08243, appendix A.1) and its code
(facebookresearch/ijepa, src/train.py) for ViT-B/16: a predictor of width 384 and depth 6, one
context block (scale 0.85-1, aspect 1) and four target blocks (scale 0.15-0.2, aspect 0.75-1.5),
smooth-L1 on LayerNorm-ed targets, EMA momentum 0.996 -> 1, AdamW (no decay on biases and 1-D
parameters), bf16 compute. SONICHU's own pretraining settings (epochs, batch, learning rate) are
unpublished; batch and learning rate follow sonichu_spec.md section 6.3's assumption (lr scaled by
batch / 2048 from 1e-3).

  python -m launch.train --config=configs/sonichu/pretrain_ijepa.py --workdir=workdirs/ijepa

Schedules as the original's (launch/optim.py): the learning rate warms up linearly from start_lr to
lr, then follows a cosine to final_lr 1e-6; the weight decay ramps 0.04 -> 0.4 on a cosine (the
code's ramp; the paper says linear). start_lr and lr are the code's (2e-4 and 1e-3 at batch 2048),
scaled by batch / 2048.

The small variant (`:sim`): the 4-block ViT of width 64 of keypoints.py:sim (256x256 input, 32 px
patches: an 8x8 token grid) on synthetic ultrasound images, a 2-block predictor; about two minutes
on two CPU cores:

  python -m launch.train --config=configs/sonichu/pretrain_ijepa.py:sim --workdir=workdirs/ijepa_sim

With `--config.frozen_target.workdir=RUN` the target encoder is RUN's encoder, frozen (SALT):

  python -m launch.train --config=configs/sonichu/pretrain_ijepa.py:sim \
      --config.frozen_target.workdir=workdirs/ijepa_sim --workdir=workdirs/salt_sim

The trained encoder starts keypoint training through `init_from`:
configs/sonichu/keypoints_from_ijepa.py with `--config.init_from.ijepa.workdir=workdirs/ijepa`.
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The ViT-B/16 recipe, or its small synthetic variant with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/sonichu/pretrain_ijepa.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'sonichu_jax.experiments.ijepa'
  c.seed = 0

  c.data = mlc.ConfigDict()
  # 'synthetic', or a folder whose train/ and val/ hold image files (any depth), e.g. an FM_UIA
  # data folder (its labels are not used).
  c.data.dataset = 'synthetic'
  c.data.max_val_images = 64  # Validation images of a folder (a seeded choice).
  c.data.image_size = 256
  c.data.crop_scale = (0.3, 1.0)  # I-JEPA's RandomResizedCrop scale.
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.num_train = 4096
  c.data.synthetic.num_val = 64
  c.data.synthetic.seed = 0
  c.data.synthetic.image_hw = (256, 320)

  # sonichu_jax.data.ijepa_masks.MaskConfig fields (the grid follows from the model).
  c.masks = mlc.ConfigDict()
  c.masks.num_targets = 4
  c.masks.target_scale = (0.15, 0.2)
  c.masks.target_aspect = (0.75, 1.5)
  c.masks.context_scale = (0.85, 1.0)
  c.masks.context_aspect = (1.0, 1.0)
  c.masks.min_keep = 10
  c.masks.allow_overlap = False
  # True: the original collator exactly (per-batch sizes, truncation to the shortest list, no
  # block on the last row/column); False: per-example masks over the whole grid.
  c.masks.official = False
  # The context length the encoder runs: longer lists lose their trailing (bottom-right) patches,
  # as the original's truncation to the batch's shortest does (about 81 at batch 16; 0: no cap,
  # pad to the whole grid). Per-example contexts hold 118 patches in the median (90th percentile
  # 151), so 128 halves the context encoder's tokens against 256 and still truncates less than the
  # original: its training step went 29.2 -> 15.9 s at batch 8 (BENCHMARKS.md).
  c.masks.max_context = 128

  # SONICHU's ViT-B/16 (sonichu_jax/models/vit.py); the I-JEPA predictor for ViT-B.
  c.model = mlc.ConfigDict()
  c.model.patch_size = 16
  c.model.embed_dim = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.mlp_ratio = 4.0
  c.predictor = mlc.ConfigDict()
  c.predictor.dim = 384
  c.predictor.depth = 6
  c.predictor.num_heads = 12
  c.predictor.mlp_ratio = 4.0
  c.compute_dtype = 'bfloat16'  # The original's bf16 autocast; parameters stay float32.

  c.ema = (0.996, 1.0)
  # The frozen-teacher variant (SALT, as US-JEPA; docs/ijepa.md, "Frozen teacher"): a run folder
  # or step folder whose encoder becomes the target encoder, never updated (the EMA is then off):
  # an I-JEPA run's target encoder (or a converted official checkpoint, launch.convert
  # --model=ijepa) or a keypoint run's backbone, of the same architecture. '': the EMA target.
  c.frozen_target = mlc.ConfigDict()
  c.frozen_target.workdir = ''
  c.frozen_target.checkpoint = 'best'  # 'best' (else the latest), 'latest' or a step number.

  c.batch_size = 512
  c.num_workers = 8
  c.num_epochs = 300
  c.total_steps = mlc.config_dict.placeholder(int)
  c.warmup_epochs = 15.0  # The paper's 15 warmup epochs.
  c.optim = mlc.ConfigDict()
  c.optim.lr = 1e-3 * 512 / 2048
  c.optim.schedule = 'ijepa_warmup_cosine'
  c.optim.start_lr = 2e-4 * 512 / 2048
  c.optim.final_lr = 1e-6
  c.optim.weight_decay = 0.04
  c.optim.final_weight_decay = 0.4
  # The original's param groups: no decay on biases and 1-D parameters (LayerNorm scales).
  c.optim.no_decay = ('.*/bias', '.*/scale')
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = mlc.config_dict.placeholder(float)  # None: no clipping, as I-JEPA.
  # The encoder's sin-cos table is a frozen parameter in the original (requires_grad=False).
  c.frozen = ('encoder/pos_embed',)

  c.eval_every_epochs = 10
  c.num_eval_figures = 4
  c.best_metric = ''  # The pretext loss does not rank representations; keep the last state.
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50

  if variant == 'sim':
    # The backbone of configs/sonichu/keypoints.py:sim (256 px, 32 px patches: an 8x8 grid), so
    # that its init_from takes these encoders as they are.
    c.data.synthetic.num_train = 256
    c.data.synthetic.num_val = 16
    c.data.synthetic.image_hw = (128, 160)
    c.model.patch_size = 32
    c.model.embed_dim = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.predictor.dim = 32
    c.predictor.depth = 2
    c.predictor.num_heads = 4
    c.compute_dtype = 'float32'
    c.num_workers = 0
    c.batch_size = 16
    c.masks.max_context = 0  # The whole 8x8 grid: the runs of docs/ijepa.md's study.
    c.num_epochs = 20  # 16 steps per epoch: 320 steps.
    c.warmup_epochs = 2.0
    c.optim.lr = 1e-3
    c.optim.start_lr = 2e-4
    c.eval_every_epochs = 10
    c.checkpoint_every_steps = 160
    c.log_every_steps = 16
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
