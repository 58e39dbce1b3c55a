"""Baseline: DCLNet (Guo et al. 2020; DualTrack's scripts/baselines/train_dcnet.py + dcnet.yaml).

A 3D ResNeXt-50 with a self-attention gate (`models.baselines.DCLNet`) regresses, from a clip of
`data.window` = 5 consecutive frames, the mean of the clip's 4 relative pose vectors; MSE, plus
the optional correlation loss (`correlation_weight`, off as in dcnet.yaml). Training draws one
random clip per sweep per epoch (`pipeline.local_windows`).

Test, as the script's `val_transform`: the normalised sweep is zero-padded by 2 frames at both
ends and every frame's centred 5-frame window is predicted (stride 1, N outputs); the outputs of
frames 1 .. N - 1 are taken as the motions from the previous frame, so an N-frame sweep gives
N - 1 motions. Sweeps shorter than the window are refused.

Departure: the script crops the TUS-REC frames to rows 50:274 and the centre 224 columns; here
the 224 x 224 crop is centred (random in training if configured), as for every other model, so
that all methods see the same crop frame.
"""
from typing import Any

import jax
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models
from ultrasound_common import errors


class Experiment(baselines.SweepPrediction, common.LocalExperimentBase):
  """DCLNet training on clips and sliding-window whole-sweep evaluation (`launch/experiment.py`)."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    window = config.data.get('window')
    if not isinstance(window, int) or window < 3 or window % 2 == 0:
      raise errors.InputError(
          f'config.data.window={window!r}: DCLNet takes clips of an odd number of frames >= 3 '
          '(the original: 5), centred on the predicted frame; frame pairs are the 2-frame CNN\'s '
          'input (configs/dualtrack/baseline_two_frame.py)')
    self.min_frames = window
    self.model = models.DCLNet(**common.module_kwargs(config.model), dtype=common.dtype(config))
    self._apply = jax.jit(self.model.apply)
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.local_windows(
        self.train_records, window=self.config.data.window, crop_hw=self.crop,
        batch_size=self.config.batch_size, seed=seed, augment=self.augmentation,
        shard_index=shard_index, shard_count=shard_count)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init(rng, baselines.normalize(batch['images'], self.config.data)))

  def loss_fn(self, variables, batch, rng):
    del rng  # The original's dropout1 is never applied.
    pred, updates = self.model.apply(
        variables, baselines.normalize(batch['images'], self.config.data), train=True,
        mutable=['batch_stats'])
    target = batch['targets'].mean(axis=1)  # The mean motion of the clip.
    mse = losses.pose_mse(pred, target)
    loss = mse
    if self.config.correlation_weight:
      loss = loss + self.config.correlation_weight * baselines.correlation_loss(pred, target)
    return loss, ({'mse': mse}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N - 1, 6) relative pose vectors of a whole sweep item (centre crops), sliding windows."""
    images = np.asarray(item['images'])
    window = self.config.data.window
    baselines.require_frames(len(images), window, f'sweep {item.get("sweep_id", "")}'.strip())
    data = self.config.data
    frames = ((images.astype(np.float32) / 255.0 - data.get('pixel_mean', 0.0))
              / data.get('pixel_std', 1.0))
    # Zero frames after normalisation, as torch.nn.functional.pad of the normalised sweep.
    padded = np.pad(frames, ((window // 2, window // 2), (0, 0), (0, 0)))
    clips = np.moveaxis(np.lib.stride_tricks.sliding_window_view(padded, window, axis=0), -1, 1)
    poses = baselines.chunked(lambda x: self._apply(variables, x), clips,
                              self.config.eval_batch_size)
    return np.asarray(poses[1:], np.float64)
