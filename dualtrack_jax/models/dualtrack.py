"""The DualTrack model: local encoder, global encoder, fusion BERT and head.

`DualTrack` maps a sweep of N frames to the N - 1 relative pose vectors [tx, ty, tz (mm), rx, ry,
rz (deg)] of T_k^-1 T_{k+1}. `LocalEncoder` (stages 2 and 3 of the local encoder, and the local
branch of the whole model) and `GlobalEncoder` (whose `fc` head is the global pretraining stage)
are also trained on their own. Stage 1 is `local_encoder.LocalEncoderStage1`, whose `backbone`
tree equals `LocalEncoder`'s `cnn` tree. The original's architecture, layer by layer, is described
in docs/dualtrack.md, section "Architecture".

torch state-dict prefix -> Flax path (layouts as in resnet3d.py, resnet2d.py, transformer.py):
  global_encoder.backbone.0.backbone.*       -> global_encoder/backbone/* (resnet2d.ImageResNet)
  global_encoder.{proj,fc}                   -> global_encoder/{proj,fc}
  global_encoder.pos_emb.weight              -> global_encoder/pos_emb/embedding
  global_encoder.bert.layer.{i}.*            -> global_encoder/bert/layer_{i}/*
  local_encoder.0.backbone.module.backbone.module.backbone.* -> local_encoder/cnn/*
  local_encoder.0.backbone.module.vit.*      -> local_encoder/vit/*
  local_encoder.0.backbone.module.fc         -> local_encoder/vit_fc (stage-2 head)
  local_encoder.0.temporal_encoder.encoder.layer.{i}.* -> local_encoder/temporal/layer_{i}/*
  local_encoder.0.temporal_encoder.fc        -> local_encoder/temporal_fc (stage-3 head)
  local_encoder.1.weight                     -> local_encoder/proj/kernel
  fusion_module.module.layer.{i}.*           -> fusion/layer_{i}/*
  head.fc                                    -> head

Freezing: the original's `FrozenModuleWrapper` keeps frozen parts in eval mode even when the model
trains (BatchNorm uses running statistics) and runs them without gradients. `LocalEncoder.frozen`
and `GlobalEncoder.frozen_backbone` do both (eval-mode BN and `stop_gradient`); excluding those
parameters from the optimiser is the training config's `frozen` sub-trees.

Inference and accelerator options (docs/performance.md), each computing the same function from
the same parameters: `attention_implementation` ('einsum', 'xla', 'cudnn') for every ViT and BERT
attention, `conv3d_implementation` ('frame_conv', 'native') for the local 3D CNN, and
`fold_batch_norm` for variables whose BatchNorm is folded into the convolutions
(`fold_batch_norm` below).
"""
from collections.abc import Sequence
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax import tiling
from dualtrack_jax.models import resnet2d
from dualtrack_jax.models import resnet3d
from dualtrack_jax.models import transformer
from ultrasound_common import errors

CNN_CHUNKING = (None, 'torch_chunk', 'exact_tiling')
LOCAL_FROZEN = ('none', 'cnn', 'cnn+vit')

# The released models as `DualTrack(**preset)` keyword arguments (docs/dualtrack.md, section
# "Released models").
TUS_REC_2024 = types.MappingProxyType(dict(max_positions=1024, cnn_chunking=None))
TUS_REC_2025 = types.MappingProxyType(
    dict(max_positions=4096, cnn_chunking='torch_chunk', max_subsequence=1024))


def regular_grid_indices(num_frames: int, spacing: int = 16) -> np.ndarray:
  """The global encoder's frames (`RegularGridSampler`): 0, spacing, 2 spacing, ... < num_frames."""
  if num_frames < 1 or spacing < 1:
    raise errors.InputError(f'regular_grid_indices: need num_frames >= 1 and spacing >= 1, got '
                            f'{num_frames}, {spacing}')
  return np.arange(0, num_frames, spacing, dtype=np.int32)


def _frames(images: jax.Array, module: str, field: str) -> jax.Array:
  """(B, T, H, W[, 1]) float frames -> (B, T, H, W, 1)."""
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise errors.InputError(f'{module}: {field} must be float in [0, 1], got {images.dtype} '
                            '(divide uint8 frames by 255 first)')
  if images.ndim == 4:
    images = images[..., None]
  if images.ndim != 5 or images.shape[-1] != 1:
    raise errors.InputError(f'{module}: {field} must be (B, T, H, W) or (B, T, H, W, 1), '
                            f'got shape {images.shape}')
  return images


def fold_batch_norm(variables: Any) -> dict[str, Any]:
  """`variables` of any model here for the same model with `fold_batch_norm=True` (inference)."""
  return resnet3d.fold_batch_norm(variables)


def _pose_head(name: str, fan_in: int, param_dtype: Any) -> nn.Dense:
  # Pose heads run in float32 whatever the compute dtype: outputs are regressed in mm and degrees.
  return transformer.torch_linear(6, fan_in, name=name, param_dtype=param_dtype)


class LocalEncoder(nn.Module):
  """Local encoder stages 2 and 3: 3D CNN -> per-frame ViT (CLS) [-> temporal BERT] [-> proj].

  Attributes:
    stage: 2 (CNN -> ViT, training head `vit_fc`) or 3 (+ relative-key temporal BERT, training
      head `temporal_fc`; `vit_fc` is kept, as in the original's state dict).
    cnn_widths, cnn_stem_width, cnn_temporal_kernels: the `resnet3d.VideoResNet` (`cnn`).
    cnn_chunking: how the CNN runs over a long sweep: None (one pass), 'torch_chunk' (the 2025
      model's inexact `torch.chunk` chunking, where frames near an internal chunk border see zero
      padding; docs/dualtrack.md, section "Long sweeps") or 'exact_tiling' (tiles of
      `max_subsequence` frames with the CNN's receptive radius as halo: equals one pass).
    max_subsequence: the chunk / tile length for `cnn_chunking`.
    vit_feature_map_size, vit_patch_size, vit_layers, vit_heads, vit_intermediate: the ViT (`vit`);
      the feature map is the crop size / 16 (16 for the original 256 x 256 crops).
    hidden: ViT and temporal BERT width (64).
    temporal_layers, temporal_heads, temporal_intermediate: the temporal BERT (`temporal`).
    max_positions: P of the temporal BERT's relative-key tables; sweeps are at most P frames.
    dropout: temporal BERT dropout in training (the ViT has none, as in HF's ViTConfig).
    proj_features: width of the bias-free projection `proj` (512 inside DualTrack); None: none.
    frozen: 'none', 'cnn' or 'cnn+vit': parts that run in eval mode (BN running statistics) and
      without gradient even when `train` is True (the original freezes the CNN from stage 2 on and
      CNN + ViT from stage 3 on).
    dtype: computation dtype; param_dtype: parameter dtype.
    attention_implementation, conv3d_implementation, fold_batch_norm: module docstring.
  """
  stage: int = 3
  cnn_widths: Sequence[int] = (64, 128, 256, 512)
  cnn_stem_width: int = 45
  cnn_temporal_kernels: Sequence[int] = resnet3d.LARGE_WINDOW
  cnn_chunking: str | None = None
  max_subsequence: int | None = None
  vit_feature_map_size: int = 16
  vit_patch_size: int = 2
  vit_layers: int = 4
  vit_heads: int = 4
  vit_intermediate: int = 32
  hidden: int = 64
  temporal_layers: int = 4
  temporal_heads: int = 4
  temporal_intermediate: int = 32
  max_positions: int = 1024
  dropout: float = 0.1
  proj_features: int | None = None
  frozen: str = 'cnn+vit'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  def _cnn(self, **kwargs) -> resnet3d.VideoResNet:
    return resnet3d.VideoResNet(self.cnn_widths, self.cnn_stem_width, self.cnn_temporal_kernels,
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                conv3d_implementation=self.conv3d_implementation,
                                fold_batch_norm=self.fold_batch_norm, **kwargs)

  def _check(self, num_frames: int) -> None:
    if self.stage not in (2, 3):
      raise errors.InputError(f'LocalEncoder: stage must be 2 or 3, got {self.stage} (stage 1 is '
                              'local_encoder.LocalEncoderStage1)')
    if self.frozen not in LOCAL_FROZEN:
      raise errors.InputError(
          f'LocalEncoder: frozen must be one of {LOCAL_FROZEN}, got {self.frozen!r}')
    if self.cnn_chunking not in CNN_CHUNKING:
      raise errors.InputError(f'LocalEncoder: cnn_chunking must be one of {CNN_CHUNKING}, got '
                              f'{self.cnn_chunking!r}')
    if (self.cnn_chunking is None) != (self.max_subsequence is None):
      raise errors.InputError(
          'LocalEncoder: max_subsequence is needed by, and only by, cnn_chunking '
          f'(cnn_chunking={self.cnn_chunking!r}, '
          f'max_subsequence={self.max_subsequence})')
    if self.stage == 3 and num_frames > self.max_positions:
      raise errors.InputError(
          f'LocalEncoder: {num_frames} frames > {self.max_positions} positions of '
          'the temporal BERT (max_positions); the sweep is too long')

  def _cnn_features(self, cnn: resnet3d.VideoResNet, frames: jax.Array,
                    train: bool) -> jax.Array:
    if self.cnn_chunking is None:
      return cnn(frames, train=train)
    if self.cnn_chunking == 'torch_chunk':
      return tiling.chunked_temporal_apply(lambda x: cnn(x, train=train), frames,
                                           max_len=self.max_subsequence)
    if train:
      raise errors.InputError(
          "LocalEncoder: cnn_chunking='exact_tiling' needs the CNN's batch norm in "
          "eval mode (train=False or a frozen CNN): the batch statistics of tiles "
          'are not those of the sweep')
    if self.is_initializing():
      return cnn(frames)
    # The tiles run in a lax.map under jit, where a bound Flax module cannot be called: apply an
    # unbound copy of the CNN to its variables instead.
    variables, unbound = cnn.variables, self._cnn(parent=None)
    return tiling.tiled_temporal_apply(lambda x: unbound.apply(variables, x), frames,
                                       tile=self.max_subsequence, halo=cnn.temporal_radius)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, head: bool = False) -> jax.Array:
    """Encodes every frame of a sweep (or window) in its temporal context.

    Args:
      images: float frames in [0, 1] (uint8 / 255), (B, N, H, W) or (B, N, H, W, 1); H and W are
        16 * vit_feature_map_size (256 for the released model).
      train: training mode: batch norm statistics of the non-frozen CNN, dropout in the temporal
        BERT (rng 'dropout').
      head: return the stage's training head instead of the features.

    Returns:
      head=False: (B, N, proj_features) if proj_features else (B, N, hidden) features;
      head=True: (B, N - 1, 6) relative pose vectors of T_k^-1 T_{k+1} from `vit_fc` (stage 2)
      or `temporal_fc` (stage 3).
    """
    frames = _frames(images, 'LocalEncoder', 'images')
    batch, num_frames = frames.shape[:2]
    self._check(num_frames)
    cnn = self._cnn(name='cnn')
    maps = self._cnn_features(cnn, frames, train and self.frozen == 'none')
    if self.frozen != 'none':
      maps = jax.lax.stop_gradient(maps)
    tokens = transformer.ViTEncoder(
        self.vit_feature_map_size, self.vit_patch_size, self.hidden, self.vit_layers,
        self.vit_heads, self.vit_intermediate, self.dtype, self.param_dtype,
        self.attention_implementation, name='vit')(
            maps.reshape(batch * num_frames, *maps.shape[2:])).reshape(batch, num_frames, -1)
    if self.frozen == 'cnn+vit':
      tokens = jax.lax.stop_gradient(tokens)
    features = tokens
    if self.stage == 3:
      features = transformer.BertEncoder(
          self.temporal_layers, self.temporal_heads, self.temporal_intermediate,
          self.max_positions, dropout=self.dropout, dtype=self.dtype,
          param_dtype=self.param_dtype, attention_implementation=self.attention_implementation,
          name='temporal')(features, deterministic=not train)
    # Every head of the original's state dict exists, used or not; only the stage's (the last
    # one) runs outside init.
    heads = {'vit_fc': tokens, 'temporal_fc': features} if self.stage == 3 else {'vit_fc': tokens}
    for name, inputs in heads.items():
      if self.is_initializing() or (head and name == list(heads)[-1]):
        poses = _pose_head(name, self.hidden, self.param_dtype)(inputs.astype(jnp.float32))
    if self.proj_features is not None and (not head or self.is_initializing()):
      features = transformer.torch_linear(
          self.proj_features, self.hidden, use_bias=False, name='proj', dtype=self.dtype,
          param_dtype=self.param_dtype)(features)
    return poses[:, 1:] if head else features


class GlobalEncoder(nn.Module):
  """Global encoder: the original's `SimpleModelForSparseTrackingEstimation`, CNN backbone.

  Per-frame 2D ResNet (`backbone`) -> spatial mean -> `proj` -> + `pos_emb`[absolute frame index]
  -> `bert` (post-LN BERT, no positional term inside attention) -> (B, M, hidden) tokens, or the
  pretraining head `fc` (relative transforms between consecutive sampled frames).

  Attributes:
    cnn_widths, cnn_stem_width: the `resnet2d.ImageResNet`.
    hidden: token width (512); the BERT's feed-forward width is 2 * hidden, as in the original.
    num_layers, num_heads: the BERT.
    max_positions: rows of `pos_emb`; every frame index must be below it.
    dropout: BERT dropout in training.
    frozen_backbone: run the CNN in eval mode and without gradient (`freeze_global_image_encoder`,
      off in the released recipe, whose fusion training updates the global BN statistics).
    dtype: computation dtype; param_dtype: parameter dtype.
    attention_implementation, fold_batch_norm: module docstring.
  """
  cnn_widths: Sequence[int] = (64, 128, 256, 512)
  cnn_stem_width: int = 45
  hidden: int = 512
  num_layers: int = 8
  num_heads: int = 8
  max_positions: int = 1024
  dropout: float = 0.1
  frozen_backbone: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'
  fold_batch_norm: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, indices: jax.Array, *, train: bool = False,
               head: bool = False) -> jax.Array:
    """Encodes M sampled frames of a sweep.

    Args:
      images: (B, M, H, W) or (B, M, H, W, 1) float frames (224 x 224 in the released model).
      indices: (B, M) or (M,) int frame indices of the images in their sweep (for `pos_emb`).
        Concrete indices are checked against max_positions; traced ones cannot be.
      train: batch statistics in the (non-frozen) CNN, dropout in the BERT (rng 'dropout').
      head: return the pretraining head's (B, M - 1, 6) pose vectors of consecutive sampled
        frames instead of the (B, M, hidden) tokens.
    """
    frames = _frames(images, 'GlobalEncoder', 'images')
    batch, num_frames = frames.shape[:2]
    if indices.shape not in ((num_frames,), (batch, num_frames)):
      raise errors.InputError(
          f'GlobalEncoder: indices must be ({num_frames},) or ({batch}, '
          f'{num_frames}) for images of shape {images.shape}, got {indices.shape}')
    if not isinstance(indices, jax.core.Tracer) and indices.size:
      low, high = int(np.min(indices)), int(np.max(indices))
      if low < 0 or high >= self.max_positions:
        raise errors.InputError(
            f'GlobalEncoder: frame index {high if low >= 0 else low} is outside the '
            f'{self.max_positions} rows of pos_emb (max_positions)')
    maps = resnet2d.ImageResNet(self.cnn_widths, self.cnn_stem_width, self.dtype,
                                self.param_dtype, self.fold_batch_norm, name='backbone')(
        frames.reshape(batch * num_frames, *frames.shape[2:]),
        train=train and not self.frozen_backbone)
    pooled = maps.astype(jnp.float32).mean(axis=(1, 2)).reshape(batch, num_frames, -1)
    if self.frozen_backbone:
      pooled = jax.lax.stop_gradient(pooled)
    tokens = transformer.torch_linear(self.hidden, pooled.shape[-1], name='proj', dtype=self.dtype,
                                      param_dtype=self.param_dtype)(pooled)
    tokens = tokens + nn.Embed(self.max_positions, self.hidden,
                               embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding
                               dtype=self.dtype, param_dtype=self.param_dtype, name='pos_emb')(
        jnp.broadcast_to(indices, (batch, num_frames)))
    tokens = transformer.BertEncoder(
        self.num_layers, self.num_heads, 2 * self.hidden, dropout=self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, attention_implementation=self.attention_implementation,
        name='bert')(tokens, deterministic=not train)
    if head or self.is_initializing():
      poses = _pose_head('fc', self.hidden, self.param_dtype)(tokens.astype(jnp.float32))
      if head:
        return poses[:, 1:]
    return tokens


class DualTrack(nn.Module):
  """The DualTrack model; defaults are the TUS-REC 2024 model (101,853,702 parameters).

  Attributes:
    max_positions: P of every position table (global `pos_emb`, temporal and fusion relative-key
      tables): sweeps are at most P frames (1024, or 4096 for the 2025 finetune).
    grid_spacing: frames between the global encoder's samples (16).
    hidden: global, fusion and projected local width (512); feed-forward widths are 2 * hidden.
    fusion_layers, fusion_heads: the fusion BERT (`fusion`: relative-key self-attention over the
      local tokens, cross-attention to the global ones).
    dropout: BERT dropout in training (temporal, global and fusion; HF's 0.1).
    local_*, cnn_chunking, max_subsequence, vit_*: `LocalEncoder` attributes (`local_encoder`,
      stage 3 with `proj`); local_hidden is its `hidden` (64), local_frozen its `frozen`.
    global_*: `GlobalEncoder` attributes (`global_encoder`); global_frozen_backbone is its
      `frozen_backbone`.
    dtype: computation dtype (jnp.bfloat16 for mixed precision); param_dtype: parameter dtype.
    attention_implementation, conv3d_implementation, fold_batch_norm: module docstring; for
      every part.
  """
  max_positions: int = 1024
  grid_spacing: int = 16
  hidden: int = 512
  fusion_layers: int = 12
  fusion_heads: int = 8
  dropout: float = 0.1
  local_cnn_widths: Sequence[int] = (64, 128, 256, 512)
  local_cnn_stem_width: int = 45
  local_cnn_temporal_kernels: Sequence[int] = resnet3d.LARGE_WINDOW
  cnn_chunking: str | None = None
  max_subsequence: int | None = None
  vit_feature_map_size: int = 16
  vit_patch_size: int = 2
  vit_layers: int = 4
  vit_heads: int = 4
  vit_intermediate: int = 32
  local_hidden: int = 64
  temporal_layers: int = 4
  temporal_heads: int = 4
  temporal_intermediate: int = 32
  local_frozen: str = 'cnn+vit'
  global_cnn_widths: Sequence[int] = (64, 128, 256, 512)
  global_cnn_stem_width: int = 45
  global_layers: int = 8
  global_heads: int = 8
  global_frozen_backbone: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'
  conv3d_implementation: str = 'frame_conv'
  fold_batch_norm: bool = False

  def local_encoder_kwargs(self) -> dict[str, Any]:
    """`LocalEncoder` keyword arguments of the local branch (also built from cached features)."""
    return dict(
        stage=3, cnn_widths=self.local_cnn_widths, cnn_stem_width=self.local_cnn_stem_width,
        cnn_temporal_kernels=self.local_cnn_temporal_kernels, cnn_chunking=self.cnn_chunking,
        max_subsequence=self.max_subsequence, vit_feature_map_size=self.vit_feature_map_size,
        vit_patch_size=self.vit_patch_size, vit_layers=self.vit_layers, vit_heads=self.vit_heads,
        vit_intermediate=self.vit_intermediate, hidden=self.local_hidden,
        temporal_layers=self.temporal_layers, temporal_heads=self.temporal_heads,
        temporal_intermediate=self.temporal_intermediate, max_positions=self.max_positions,
        proj_features=self.hidden, frozen=self.local_frozen, dropout=self.dropout,
        dtype=self.dtype, param_dtype=self.param_dtype,
        attention_implementation=self.attention_implementation,
        conv3d_implementation=self.conv3d_implementation, fold_batch_norm=self.fold_batch_norm)

  @nn.compact
  def __call__(self, local_images: jax.Array, global_images: jax.Array, *,
               train: bool = False) -> jax.Array:
    """Predicts the relative transforms between consecutive frames of a sweep.

    Args:
      local_images: (B, N, H, W[, 1]) float local-encoder frames in [0, 1] (256 x 256 centre
        crops of uint8 / 255 in the released model).
      global_images: the global-encoder frames, (B, N, H', W'[, 1]) (every frame; the ones at
        `regular_grid_indices(N, grid_spacing)` are gathered here) or (B, M, H', W'[, 1]) with
        M = len(regular_grid_indices(N, grid_spacing)) (already gathered, so that callers need
        not move all N frames to the device). 224 x 224 full frames / 255 in the released model.
      train: training mode: BN statistics in the non-frozen CNNs, dropout in the BERTs (rng
        'dropout').

    Returns:
      (B, N - 1, 6) [tx, ty, tz mm, rx, ry, rz deg] of T_k^-1 T_{k+1}, k = 0 .. N - 2.
    """
    local_images = _frames(local_images, 'DualTrack', 'local_images')
    global_images = _frames(global_images, 'DualTrack', 'global_images')
    batch, num_frames = local_images.shape[:2]
    if global_images.shape[0] != batch:
      raise errors.InputError(f'DualTrack: global_images has batch {global_images.shape[0]}, '
                              f'local_images {batch}')
    if global_images.shape[1] == num_frames:
      # The frames at regular_grid_indices, as a strided slice: also for a symbolic num_frames
      # (jax.export), for which the checks below are the export's shape constraints instead.
      global_images = global_images[:, ::self.grid_spacing]
    if isinstance(num_frames, int):
      # Refuse before any computation what the torch model only finds deep inside (IndexError).
      if num_frames < 2:
        raise errors.InputError(f'DualTrack: a sweep needs at least 2 frames, got {num_frames}')
      if num_frames > self.max_positions:
        raise errors.InputError(f'DualTrack: {num_frames} frames > {self.max_positions} positions '
                                '(max_positions) of the position tables; the sweep is too long')
      grid = len(regular_grid_indices(num_frames, self.grid_spacing))
      if global_images.shape[1] != grid:
        raise errors.InputError(
            f'DualTrack: global_images must hold all {num_frames} frames or the '
            f'{grid} frames at regular_grid_indices({num_frames}, '
            f'{self.grid_spacing}), got {global_images.shape[1]}')
    indices = jnp.arange(global_images.shape[1], dtype=jnp.int32) * self.grid_spacing
    kw = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
              attention_implementation=self.attention_implementation)
    local = LocalEncoder(**self.local_encoder_kwargs(), name='local_encoder')(
        local_images, train=train)
    context = GlobalEncoder(
        cnn_widths=self.global_cnn_widths, cnn_stem_width=self.global_cnn_stem_width,
        hidden=self.hidden, num_layers=self.global_layers, num_heads=self.global_heads,
        max_positions=self.max_positions, frozen_backbone=self.global_frozen_backbone,
        fold_batch_norm=self.fold_batch_norm, name='global_encoder', **kw)(
            global_images, indices, train=train)
    fused = transformer.BertEncoder(
        self.fusion_layers, self.fusion_heads, 2 * self.hidden, self.max_positions,
        cross_attention=True, name='fusion', **kw)(local, context, deterministic=not train)
    return _pose_head('head', self.hidden, self.param_dtype)(fused.astype(jnp.float32))[:, 1:]
