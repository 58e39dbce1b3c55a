"""Baseline: the 2-frame CNN of Prevost et al. 2018 (DualTrack's train_2_frame_cnn.py).

Two frames stacked as channels go through an image CNN that regresses the 6-vector of their
relative pose. Training draws one random pair per sweep per epoch (the script's "tus_rec" epoch
mode), consecutive or, with probability `data.skip_frame_p`, one frame apart, with flips and
reversal (`pipeline.frame_pairs`); the loss is the MSE of the pose vector. At test time every
consecutive pair of the sweep is predicted and the N - 1 motions are chained into the trajectory
by `common.SweepEvaluator`, as the original's `compute_predictions_for_sweep`.

Departures from the script, on purpose: frames are cropped (random crop in training, centre crop
at test, as every DualTrack stage) rather than resized, so that the motion is expressed in the
same crop frame as the other methods' and the metrics compare; the script's horizontal flip
mirrors the rows (`torch.flip(dims=(1,))` of a (C, H, W) tensor) while changing the tracking as
for a column mirror, a bug replaced by `transforms.horizontal_flip`.

Optical flow (`config.data.optical_flow`, the script's `--optical_flow`, off in the README
command): two more input channels, the dense Farneback flow from the first frame to the second
(OpenCV's `calcOpticalFlowFarneback` with the script's parameters, in pixels, not normalised), on
the uint8 frames the network sees. Departures: the flow is computed after the crop, flip and
reversal (the script computes it before its flip, so a flipped pair keeps the unflipped flow
field's horizontal component: a bug not reproduced), and every backbone takes it (the script
widens only resnet10t's stem to 4 channels).

Backbones (`config.model.backbone`): 'prevost' (`Prevost2018ConvNet`, `--model prevostnet`),
'resnet10t' (timm's, `--model resnet10`, the script's default) and 'efficientnet_b1' (timm's, the
README command), each with 2 input channels, 6 outputs and the script's dropout 0.25.

`config.loss='points'` is the TUS-REC challenge baseline's loss (configs/dualtrack/
baseline_two_frame.py:challenge): the image's four corner pixels mapped by the predicted and by
the true relative transform, the MSE of their coordinates in mm (`baselines.point_mse`), with
the challenge's point distance logged. The network still outputs this project's pose vector (the
challenge's network outputs ZYX Euler angles in radians and a translation in the corner-origin
image frame: the same rigid transform, another parameterisation), so chaining and metrics are
unchanged; the corners are those of the crop the network sees.
"""
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import losses
from dualtrack_jax.data import pipeline
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines as models
from dualtrack_jax.models import efficientnet
from dualtrack_jax.models import resnet_timm
from ultrasound_common import errors

BACKBONES = ('prevost', 'resnet10t', 'efficientnet_b1')
LOSSES = ('pose', 'points')
EXPERIMENT = 'the 2-frame CNN baseline (dualtrack_jax.experiments.baseline_two_frame)'
# The torch state dict of each backbone (`train_2_frame_cnn.create_model`) <-> its variables.
TABLES = {'prevost': baselines.PREVOST_CONVNET, 'resnet10t': baselines.RESNET10T,
          'efficientnet_b1': baselines.EFFICIENTNET}


def network(model: ml_collections.ConfigDict, dtype: Any = jnp.float32):
  """The 2-frame CNN of config.model: (B, h, w, 2) stacked pairs -> (B, 6) pose vectors.

  `norm` is the Prevost ConvNet's only, `drop_path` (stochastic depth) EfficientNet's only.
  """
  backbone = baselines.check_choice(ml_collections.ConfigDict(dict(model=model)),
                                    'model.backbone', BACKBONES, EXPERIMENT)
  if model.get('norm') is not None and backbone != 'prevost':
    raise errors.InputError(f'config.model.norm={model.norm!r}: only the prevost backbone has a '
                            f'norm switch, not {backbone}')
  if model.get('drop_path', 0.0) and backbone != 'efficientnet_b1':
    raise errors.InputError(f'config.model.drop_path={model.drop_path}: only the efficientnet_b1 '
                            f'backbone has stochastic depth, not {backbone}')
  if backbone == 'prevost':
    return models.PrevostConvNet(norm=model.get('norm'), dropout=model.dropout, dtype=dtype)
  if backbone == 'resnet10t':
    return resnet_timm.ResNet10T(dropout=model.dropout, dtype=dtype)
  return efficientnet.EfficientNet(dropout=model.dropout, drop_path=model.get('drop_path', 0.0),
                                   dtype=dtype)


# calcOpticalFlowFarneback(pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags) as
# train_2_frame_cnn.py calls it.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def farneback_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """(..., h, w) uint8 frame pairs -> (..., h, w, 2) float32 flow (dx, dy) in pixels."""
  first, second = np.asarray(first, np.uint8), np.asarray(second, np.uint8)
  lead = first.shape[:-2]
  flat = zip(first.reshape(-1, *first.shape[-2:]), second.reshape(-1, *second.shape[-2:]))
  flows = [cv2.calcOpticalFlowFarneback(np.ascontiguousarray(a), np.ascontiguousarray(b), None,
                                        *FARNEBACK) for a, b in flat]
  return np.stack(flows).reshape(*lead, *first.shape[-2:], 2).astype(np.float32)


def pairs(images: np.ndarray) -> np.ndarray:
  """(N, h, w) frames -> (N - 1, h, w, 2): every consecutive pair stacked as channels."""
  return np.stack([images[:-1], images[1:]], axis=-1)


def _with_flow(batch: dict) -> dict:
  images = batch['images']  # (B, 2, h, w) uint8.
  return {**batch, 'flow': farneback_flow(images[:, 0], images[:, 1])}


class Experiment(baselines.SweepPrediction, common.LocalExperimentBase):
  """2-frame CNN training and chained whole-sweep evaluation (`launch/experiment.py`)."""
  global_source = None

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    baselines.check_choice(config, 'loss', LOSSES, EXPERIMENT)
    self.model = network(config.model, common.dtype(config))
    self.optical_flow = bool(config.data.get('optical_flow', False))
    self._apply = jax.jit(lambda variables, x, flow: self.model.apply(
        variables, self._channels(x, flow)))
    super().__init__(config, load_data=load_data)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    ds = pipeline.frame_pairs(
        self.train_records, crop_hw=self.crop, batch_size=self.config.batch_size, seed=seed,
        augment=self.augmentation, skip_p=self.config.data.skip_frame_p,
        shard_index=shard_index, shard_count=shard_count)
    return ds.map(_with_flow) if self.optical_flow else ds

  def _channels(self, pairs_hwc, flow) -> jax.Array:
    """(B, h, w, 2) uint8 pairs [+ (B, h, w, 2) flow] -> the network's normalised input."""
    x = baselines.normalize(pairs_hwc, self.config.data)
    return jnp.concatenate([x, jnp.asarray(flow, x.dtype)], axis=-1) if flow is not None else x

  def _inputs(self, batch) -> jax.Array:
    # (B, 2, h, w) uint8 pairs -> (B, h, w, 2 or 4) channels.
    return self._channels(jnp.moveaxis(jnp.asarray(batch['images']), 1, -1), batch.get('flow'))

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    variables = dict(self.model.init(rng, self._inputs(batch)))
    if isinstance(self.model, resnet_timm.ResNet10T):
      variables = resnet_timm.zero_init_last(variables)
    return variables

  def loss_fn(self, variables, batch, rng):
    pred, updates = self.model.apply(variables, self._inputs(batch), train=True,
                                     rngs={'dropout': rng}, mutable=['batch_stats'])
    target = batch['targets'][:, 0]
    if self.config.loss == 'points':
      hw = batch['images'].shape[2:]
      loss = baselines.point_mse(pred, target, batch['pixel_to_image'], hw)
      distance = baselines.point_distance(pred, target, batch['pixel_to_image'], hw)
      return loss, ({'point_mse': loss, 'point_distance': distance}, dict(updates))
    loss = losses.pose_mse(pred, target, weights=self.config.loss_weights)
    return loss, ({'mse': loss}, dict(updates))

  def predict(self, variables, item: dict) -> np.ndarray:
    """(N - 1, 6) relative pose vectors of a whole sweep item: one per consecutive pair."""
    images = np.asarray(item['images'])
    baselines.require_frames(len(images), 2, f'sweep {item.get("sweep_id", "")}'.strip())
    stacked = pairs(images)
    flow = farneback_flow(images[:-1], images[1:]) if self.optical_flow else None

    def apply(rows):
      rows = np.asarray(rows)
      return self._apply(variables, stacked[rows], None if flow is None else flow[rows])

    # Chunks of pair indices (the padding rows repeat pair 0 and are dropped).
    poses = baselines.chunked(apply, np.arange(len(stacked)), self.config.eval_batch_size)
    return np.asarray(poses, np.float64)
