"""DualTrack global-encoder pretraining ("G"; docs/dualtrack.md, sections "Architecture" and
"Training recipes").

The per-frame 2D ResNet-18, projection, absolute position embedding and BERT learn the motion
between consecutive sampled frames (`pred_mode="local"`) from 64 sorted random frames per sweep
(`pipeline.global_samples`, flips and reversals), all parameters trainable. Validation: whole
sweeps sampled on the fusion model's regular grid (frames 0, 16, 32, ...), the trajectory at those
frames scored with the stage-1 metrics and baselines. (The original validates on 64 random frames
per sweep; the grid is deterministic and is what the global encoder sees inside DualTrack.)
Whole-sweep prediction (`predict_sweep`) interpolates the grid's poses to every frame.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax import pose
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import sweeps
from dualtrack_jax.experiments import common
from dualtrack_jax.models import dualtrack


class Experiment(common.LocalExperimentBase):
  """Global-encoder pretraining; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.global_source = config.data.global_source
    self.spacing = config.data.grid_spacing
    self.model = dualtrack.GlobalEncoder(**common.module_kwargs(config.model),
                                         dtype=common.dtype(config))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.global_samples(
        self.train_records, num_samples=self.config.data.num_samples,
        batch_size=self.config.batch_size, seed=seed, augment=self.augmentation,
        global_source=self.global_source, shard_index=shard_index,
        shard_count=shard_count).map(common.DeviceBatch(0))

  def _images(self, images) -> jax.Array:
    return common.normalize_global(images, self.config.data.global_normalize)

  def init(self, rng: jax.Array, batch) -> dict:
    return dict(self.model.init(rng, self._images(batch['global_images']), batch['indices'],
                                train=False))

  def loss_fn(self, variables, batch, rng):
    pred, updates = self.model.apply(
        variables, self._images(batch['global_images']), batch['indices'], train=True,
        head=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = losses.pose_mse(pred, batch['targets'])
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(M-1, 6) pose vectors between the grid frames of a whole-sweep item."""
    num_frames = len(item['images'])
    grid = dualtrack.regular_grid_indices(num_frames, self.spacing)
    images = item['global_images']
    images = images[grid] if len(images) == num_frames else images
    return self._grid_motions(variables, images, grid)

  def _grid_motions(self, variables, images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(M-1, 6) float64 pose vectors between consecutive grid frames, from their M images."""
    poses = _predict(self.model, variables, self._images(images[None]), jnp.asarray(grid[None]))
    return np.asarray(poses[0], np.float64)

  def predict_sweep(self, variables, reader: sweeps.SweepReader) -> np.ndarray:
    """(N-1, 6) float64 relative pose vectors of every frame of a sweep file, in its own frame.

    The global encoder sees only the regular grid 0, g, 2g, ... < N (g = config.data.grid_spacing,
    16: the fusion model's `RegularGridSampler`, which also leaves the last frame out unless
    N - 1 is a multiple of g). Its motions between grid frames are composed into the frame-0
    transforms G at the grid, and every other frame gets a transform interpolated between its two
    neighbouring grid frames a <= i < b, t = (i - a) / (b - a): translation linearly, rotation by
    SLERP (`pose.interpolate_rigid`). Frames after the last grid frame continue its last interval
    (t > 1: the same translation velocity and rotation rate about the same axis); a sweep of at
    most g frames has one grid frame and no predicted motion, so every frame stays at G = I. The
    relative motions of consecutive frames are then read off these transforms.

    The original never predicts every frame with the global encoder alone: its pretraining
    validation (`run_full_evaluation_loop` on `RandomSparseSampleTemporal(64)` items) scores the
    trajectory at the 64 sampled frames only, as `evaluate` here scores it at the grid frames
    only. Interpolation gives every frame a pose (for a volume, or a comparison with the other
    stages) while the grid frames keep exactly the poses `predict` and `evaluate` give them; the
    last frame is not added to the grid, since every grid token attends to every other and an
    extra one would change all of them. After the last grid frame the sweep keeps moving (for at
    most g - 1 frames), which holding the pose there would deny.

    Pretraining targets come from the uncropped frames' tracking and the global images are the
    whole frame resized, so the motions are already in the file's centred image frame: unlike the
    local stages' crops, nothing is conjugated.
    """
    num_frames = reader.num_frames
    grid = dualtrack.regular_grid_indices(num_frames, self.spacing)
    if len(grid) == 1:
      return np.zeros((num_frames - 1, 6))
    images = common.global_frames(reader, self.global_source, grid)
    at_grid = common.trajectory(self._grid_motions(variables, images, grid))
    frames = np.arange(num_frames)
    # The grid interval of each frame: the last one for the frames after the last grid frame.
    k = np.minimum(frames // self.spacing, len(grid) - 2)
    t = (frames - grid[k]) / (grid[k + 1] - grid[k])
    return pose.relative_pose_vectors(pose.interpolate_rigid(at_grid[k], at_grid[k + 1], t))


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: dualtrack.GlobalEncoder, variables, images, indices) -> jax.Array:
  return model.apply(variables, images, indices, head=True)
