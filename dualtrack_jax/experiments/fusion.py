"""DualTrack fusion training ("F") and the TUS-REC 2025 finetuning.

`dualtrack.DualTrack(**config.model)`: the global encoder from its pretraining run (fully
trainable, BN in training mode), the local encoder from stage 3 (CNN + ViT frozen, temporal BERT
trainable), projection, fusion BERT and head from scratch; whole sweeps, batch 1, dropout 0.1.
The 2025 finetuning stages are this experiment with other configs (configs/dualtrack/
finetune_2025.py). Evaluation on whole validation sweeps with the stage-1 metrics and baselines;
the CNN runs with exact tiling (equal to one pass) unless the model uses the 2025 model's inexact
`torch.chunk` chunking, which is then reproduced. Checkpoints converted from the original
(`launch.convert`) name this experiment. The original recipes are in docs/dualtrack.md, sections
"Training recipes" and "TUS-REC 2025 finetuning".

With `config.feature_cache.enabled` (no augmentation, as the 2024 fusion recipe and 2025 stage 0)
training reads the frozen CNN + ViT features of each sweep from `dualtrack_jax.feature_cache`
and runs `FusionFromFeatures`, which is DualTrack after those frozen parts: same loss, same
dropout, same gradients, without the 3D CNN (nearly all of the model's FLOPs).
"""
from collections.abc import Mapping
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import export as export_lib
from dualtrack_jax import losses
from dualtrack_jax.experiments import common
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import transformer
from ultrasound_common import errors


class FusionFromFeatures(nn.Module):
  """`dualtrack.DualTrack` on the frozen CNN + ViT features of its local branch.

  Submodules are named as DualTrack's, so it applies to a DualTrack's variables (the CNN and ViT
  subtrees are not read). Needs local_frozen='cnn+vit' (the features must not depend on
  parameters that train).
  """
  model_kwargs: Mapping[str, Any]  # DualTrack keyword arguments.

  @nn.compact
  def __call__(self, features: jax.Array, global_images: jax.Array, *,
               train: bool = False) -> jax.Array:
    """(B, N, 64) local features and (B, M, H, W) grid global images -> (B, N-1, 6) poses."""
    m = dualtrack.DualTrack(**self.model_kwargs)
    indices = dualtrack.regular_grid_indices(features.shape[1], m.grid_spacing)
    kw = dict(dropout=m.dropout, dtype=m.dtype, param_dtype=m.param_dtype,
              attention_implementation=m.attention_implementation)
    local = common.LocalFromFeatures(m.local_encoder_kwargs(), name='local_encoder')(
        features, train=train)
    context = dualtrack.GlobalEncoder(
        cnn_widths=m.global_cnn_widths, cnn_stem_width=m.global_cnn_stem_width, hidden=m.hidden,
        num_layers=m.global_layers, num_heads=m.global_heads, max_positions=m.max_positions,
        frozen_backbone=m.global_frozen_backbone, name='global_encoder', **kw)(
            global_images, indices, train=train)
    fused = transformer.BertEncoder(
        m.fusion_layers, m.fusion_heads, 2 * m.hidden, m.max_positions, cross_attention=True,
        name='fusion', **kw)(local, context, deterministic=not train)
    return transformer.torch_linear(6, m.hidden, name='head', param_dtype=m.param_dtype)(
        fused.astype(jnp.float32))[:, 1:]


class Experiment(common.SweepPrediction, common.LocalExperimentBase):
  """Fusion training on whole sweeps; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    kwargs = dict(common.module_kwargs(config.model), dtype=common.dtype(config))
    self.global_source = config.data.global_source
    self.spacing_global = kwargs.get('grid_spacing', 16)
    self.model = dualtrack.DualTrack(**kwargs)
    self.local = self.model.local_encoder_kwargs()
    self.from_features = FusionFromFeatures(kwargs)
    if kwargs.get('cnn_chunking') is None:
      # Exact tiling over long sweeps at evaluation: bounded memory, same numbers.
      kwargs = dict(kwargs, cnn_chunking='exact_tiling', max_subsequence=config.eval_tile)
    self.eval_model = dualtrack.DualTrack(**kwargs)
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    if self.features_from_cache() and self.model.local_frozen != 'cnn+vit':
      raise errors.InputError(
          f'config.feature_cache.enabled needs config.model.local_frozen='
          f"'cnn+vit' (got {self.model.local_frozen!r}): the cached features must "
          'not depend on parameters that train')
    return self.whole_sweep_dataset(seed=seed, shard_index=shard_index, shard_count=shard_count)

  def _global(self, images) -> jax.Array:
    return common.normalize_global(images, self.config.data.global_normalize)

  def init(self, rng: jax.Array, batch) -> dict:
    # Cached-feature batches carry no images; the variables only depend on the frame sizes, so
    # two local frames (one global grid frame) suffice.
    images = jnp.zeros((1, 2, *self.crop), jnp.float32)
    return dict(self.model.init(rng, images, self._global(batch['global_images'][:, :1]),
                                train=False))

  def loss_fn(self, variables, batch, rng):
    kw = dict(train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    if 'features' in batch:
      pred, updates = self.from_features.apply(
          variables, batch['features'], self._global(batch['global_images']), **kw)
    else:
      pred, updates = self.model.apply(
          variables, common.unit(batch['images']), self._global(batch['global_images']), **kw)
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N-1, 6) relative pose vectors of a whole-sweep item (centre crops, global images)."""
    num_frames = len(item['images'])
    images = item['global_images']
    if len(images) == num_frames:
      images = images[dualtrack.regular_grid_indices(num_frames, self.spacing_global)]
    poses = _predict(self.eval_model, variables, common.unit(item['images'][None]),
                     self._global(images[None]))
    return np.asarray(poses[0], np.float64)

  def export_spec(self, variables, options) -> dict[str, Any]:
    """`launch.export`: raw uint8 frames -> pose vectors, preprocessing inside
    (dualtrack_jax/export.py)."""
    return export_lib.sweep_spec(
        self.from_features.model_kwargs, variables, self.crop, self.global_source,
        tuple(self.config.data.global_normalize), options)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: dualtrack.DualTrack, variables, local_images, global_images) -> jax.Array:
  return model.apply(variables, local_images, global_images)
