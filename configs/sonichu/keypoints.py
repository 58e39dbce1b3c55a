r"""SONICHU keypoint training: ViT-B/16 backbone plus one ViTPose classic head per task.

The card gives 100 epochs, AdamW, a cosine schedule with a 3-epoch warmup (and distillation from a
5-teacher median, which is not part of this stage). Everything else is unpublished; the values
below are our assumptions, taken from ViTPose-B's COCO recipe and the FM_UIA baseline, and each
says where it comes from (docs/sonichu.md, section "Training"). One task per batch, uniform over
tasks; the heads a batch does not use get no optimiser update (optim.sparse_groups).

  python -m launch.train --config=configs/sonichu/keypoints.py --workdir=workdirs/sonichu \
      --config.data.dataset=/data/fm_uia
  python -m launch.evaluate --workdir=workdirs/sonichu

`--config.data.dataset` is an FM_UIA data folder (train/ and val/; docs/sonichu.md, section
"FM_UIA data format"). To start from I-JEPA weights, import them with
`sonichu_jax.convert.backbone_from_ijepa`; a whole SONICHU-layout file converts with
`python -m launch.convert --from=model.safetensors --to=RUN --model=sonichu`.

The small variant (`:sim`) trains a narrow 4-block ViT on synthetic images of all nine tasks in
minutes on two CPU cores, and must beat the mean-keypoints predictor by far (measured 2026-12-06:
MRE 15.6 px against 26.8 px of the mean keypoints, in 2.3 minutes on a quiet machine):

  python -m launch.train --config=configs/sonichu/keypoints.py:sim --workdir=workdirs/sonichu_sim
  python -m launch.evaluate --workdir=workdirs/sonichu_sim
  python -m launch.predict IMAGE.png --task=fetal_femur --checkpoint=workdirs/sonichu_sim
"""
import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The full recipe on FM_UIA data, or its small synthetic variant with arg='sim'."""
  variant = arg or 'full'
  if variant not in ('full', 'sim'):
    raise ValueError(f'configs/sonichu/keypoints.py: unknown variant {variant!r}; '
                     'use "full" or "sim".')
  c = mlc.ConfigDict()
  c.experiment = 'sonichu_jax.experiments.keypoints'
  c.seed = 42  # The card's split seed.

  c.data = mlc.ConfigDict()
  c.data.dataset = 'data/fm_uia'  # An FM_UIA data folder (train/, val/) or 'synthetic'.
  # The card's "fair validation": 15 % of train/ held out with seed 42 (FM_UIA's val/ has no
  # public labels).
  c.data.fair_split = True
  c.data.tasks = ()  # Empty: all nine tasks.
  # n_t ** task_exponent: 0 draws tasks uniformly, as the FM_UIA baseline's sampler.
  c.data.task_exponent = 0.0
  # Our assumed augmentations (sonichu_jax.data.augment.AugmentConfig); no flips of cardiac
  # views, whose mirror images are not standard views.
  c.data.augment = mlc.ConfigDict(dict(
      flip_p=0.5, no_flip_tasks=('PLAX', 'PSAX', 'A4C'), rotation_deg=15.0, scale=(0.75, 1.25),
      translate=0.05, max_tries=10, gamma=(0.7, 1.4), contrast=(0.8, 1.2), brightness=0.1,
      noise_std=0.03))
  # Only read when dataset == 'synthetic' (sonichu_jax.data.datasets): images per task.
  c.data.synthetic = mlc.ConfigDict()
  c.data.synthetic.num_train = 256
  c.data.synthetic.num_val = 32
  c.data.synthetic.seed = 0
  c.data.synthetic.cache_dir = ''  # '': $SONICHU_CACHE, else ~/.cache/sonichu_jax.
  c.data.synthetic.generator = mlc.ConfigDict()  # SyntheticConfig fields, e.g. image_hw.

  # SONICHU-124M: I-JEPA ViT-B/16 at 256x256, ViTPose classic heads of 256 filters.
  c.model = mlc.ConfigDict()
  c.model.patch_size = 16
  c.model.embed_dim = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.mlp_ratio = 4.0
  c.model.drop_path_rate = 0.1  # Unpublished; ViTPose-B uses 0.3, we assume 0.1.
  c.model.head_filters = 256
  c.model.temperature = 1.0  # Unpublished; raw logits, the integral-regression standard.
  # Same results, other kernels (docs/performance.md): 'einsum' | 'xla' | 'cudnn' (GPU), and
  # 'subpixel' | 'transposed' for the heads' deconvolutions.
  c.model.attention_implementation = 'einsum'
  c.model.deconv_implementation = 'subpixel'
  c.compute_dtype = 'float32'  # 'bfloat16' computes in bf16 with float32 parameters.

  c.loss = 'l1'  # On normalised coordinates (assumed); 'radial' is the MRE in original pixels.
  # An optional auxiliary heatmap term (DSNT-like: KL to a Gaussian of heatmap_sigma cells); off:
  # SONICHU is trained on coordinates.
  c.heatmap_weight = 0.0
  c.heatmap_sigma = 2.0

  # ViTPose-B: lr 5e-4 at batch 512, scaled linearly to batch 64; the card's 100 epochs and
  # cosine with a 3-epoch warmup.
  c.batch_size = 64
  c.num_workers = 8  # Grain worker processes.
  c.num_epochs = 100
  c.total_steps = mlc.config_dict.placeholder(int)  # Overrides num_epochs when set.
  c.warmup_epochs = 3.0
  c.optim = mlc.ConfigDict()
  c.optim.lr = 5e-4 * 64 / 512
  c.optim.schedule = 'linear_warmup_cosine'
  c.optim.weight_decay = 0.1  # ViTPose-B; no decay on biases, norms and the position table.
  c.optim.no_decay = ('.*/bias', '.*norm[12]?/scale', r'heads_\w+/deconv_layers_[14]/scale')
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # ViTPose-B.
  # One group per task head: a batch of another task leaves it untouched, as torch's AdamW does.
  c.optim.sparse_groups = (r'heads_(\w+)/.*',)
  # ViTPose-B's layer-wise learning-rate decay (SONICHU's is unknown; launch/optim.py and
  # docs/sonichu.md, "Layer-wise learning-rate decay"): the update of layer id l is scaled by
  # 0.75 ** (num_layers - l - 1), the weight decay with it; patch embedding and position table are
  # layer 0, block i is layer i + 1, the final norm and the heads (no rule) layer depth + 1.
  c.optim.layer_decay = 0.75
  c.optim.num_layers = c.model.get_ref('depth') + 2  # Follows --config.model.depth.
  c.optim.layer_ids = ((r'backbone/(?:patch_embed/.*|pos_embed)', 0),
                       (r'backbone/blocks_(\d+)/.*', 1))
  # I-JEPA's sin-cos position table is fixed (requires_grad=False).
  c.frozen = ('backbone/pos_embed',)

  c.eval_tta = True  # Flip test-time augmentation, as the card's "(TTA)" numbers.
  c.eval_batch_size = 64
  c.eval_every_epochs = 10
  c.best_metric = 'mre/weighted'
  c.best_mode = 'min'
  c.keep_checkpoints = 3
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50

  if variant == 'sim':
    c.data.dataset = 'synthetic'
    c.data.fair_split = False  # The synthetic data has its own validation split.
    c.data.synthetic.num_train = 128
    c.data.synthetic.num_val = 16
    c.num_workers = 0
    # A narrow 4-block ViT at the same 256x256 input, with 32x32 patches: an 8x8 token grid and
    # 32x32 heatmaps, 4x cheaper than 16x16 patches.
    c.model.patch_size = 32
    c.model.embed_dim = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.drop_path_rate = 0.0
    c.model.head_filters = 32
    # Each head gets about 1/9 of the steps; its logits start near 0 (ViTPose's N(0, 0.001) init)
    # and AdamW grows them by about lr per step, so at temperature 1 the soft-argmax would stay
    # near the image centre for most of this short run.
    c.model.temperature = 0.1
    # Dense heatmap supervision: with ~50 steps per head the coordinate loss alone does not get the
    # heads past the mean-keypoints predictor.
    c.heatmap_weight = 0.1
    c.heatmap_sigma = 1.0  # Cells of the 32x32 heatmap, 8 input pixels each.
    # Batch 8 rather than 16: the heads are step-limited here (batch 16 for 432 steps, the same
    # time, ended at 17.7 px; batch 8 for 864 steps at 15.3 px).
    c.batch_size = 8
    c.num_epochs = 6  # 144 steps per epoch: 864 steps, about 8 minutes on two loaded CPU cores.
    c.warmup_epochs = 0.5
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.01
    # Off: this variant trains from random weights, where layer decay (a fine-tuning recipe for a
    # pretrained backbone) only slows the backbone down.
    c.optim.layer_decay = 0.0
    c.eval_tta = False
    c.eval_batch_size = 8
    c.eval_every_epochs = 3
    c.checkpoint_every_steps = 200
    c.log_every_steps = 48
  # The trainer's other keys (launch/train.py), each with its default.
  return config_utils.with_runtime_keys(c)
