"""What the baseline experiments share (`baseline_*.py`): inputs, chunked inference, checks.

Every baseline trains on the same sweeps as DualTrack, evaluates on whole validation sweeps with
`common.SweepEvaluator` (the same metrics, trajectory plots and trivial predictors) and predicts
sweep files through `common.SweepPrediction`, so `launch.predict` writes the same poses,
trajectory plot and volume for a baseline run as for a DualTrack run.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import convert
from dualtrack_jax import pose
from dualtrack_jax.experiments import common
from ultrasound_common import errors

# Frames the original normalises with: /255, then the dataset's pixel mean and spread.
_PIXEL_KEYS = ('pixel_mean', 'pixel_std')

# torch state dicts of the baselines (keys without prefix): Flax paths are the torch names; the
# schemes list the module names in the original's registration (state-dict) order.
PREVOST_CONVNET = (convert.Part((), '', convert.Scheme('prevost_convnet', (
    'conv1', 'norm1', 'conv2', 'norm2', 'conv3', 'norm3', 'conv4', 'norm4', 'fc1', 'fc2'))),)
# timm's resnet10t (`models.resnet_timm.ResNet10T`): Flax paths are timm's names.
RESNET10T = (convert.Part((), '', convert.Scheme('timm_resnet10t', (
    'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'conv2', 'bn2', 'downsample',
    'fc'))),)
# timm's EfficientNet (`models.efficientnet.EfficientNet`): Flax 'blocks_3_1' is timm's
# 'blocks.3.1'. One order serves the stem, the head and the inverted-residual blocks; `to_torch`
# writes the two depthwise-separable blocks of stage 0 with conv_pw and bn2 first (torch's
# load_state_dict does not depend on the order).
EFFICIENTNET = (convert.Part((), '', convert.Scheme(
    'timm_efficientnet',
    ('conv_stem', 'conv_pw', 'bn1', 'blocks', 'conv_dw', 'conv_head', 'bn2', 'se', 'conv_reduce',
     'conv_expand', 'conv_pwl', 'bn3', 'classifier'),
    ((r'(^|/)blocks_(\d+)_(\d+)(?=/|$)', r'\1blocks/\2/\3'),))),)


def lstm_table(num_layers: int, flax_path: tuple[str, ...] = (), prefix: str = '') -> convert.Table:
  """`models.TorchLSTM` <-> torch.nn.LSTM: the parameters carry torch's names and order."""
  names = tuple(f'{kind}_{part}_l{k}' for k in range(num_layers) for kind in ('weight', 'bias')
                for part in ('ih', 'hh'))
  return (convert.Part(flax_path, prefix, convert.Scheme('lstm', names)),)


def monet_table(lstm_layers: int = 4) -> convert.Table:
  """`models.MoNet` <-> run_monet_baseline.py's `ResnetLSTM` state dict."""
  return (convert.nest(convert.VIDEO_RESNET, ('resnet',), 'resnet.')
          + lstm_table(lstm_layers, ('lstm',), 'lstm.')
          + (convert.Part(('fc',), 'fc.', convert.PLAIN_SCHEME),))


def normalize(images, data: ml_collections.ConfigDict) -> jax.Array:
  """uint8 (or [0, 1]) frames -> (x / 255 - config.data.pixel_mean) / config.data.pixel_std."""
  mean, std = (float(data.get(k, d)) for k, d in zip(_PIXEL_KEYS, (0.0, 1.0)))
  return (common.unit(images) - mean) / std


def correlation_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """1 - Pearson correlation of all elements of `pred` and `target` (flattened together).

  As the original's `get_correlation_loss` (from DIAL-RPI/FreehandUSRecon), used by MoNet and,
  optionally, DCLNet. Symmetric, so the original's swapped argument names do not matter.
  """
  x = pred.astype(jnp.float32).ravel()
  y = target.astype(jnp.float32).ravel()
  cov = jnp.mean(x * y) - jnp.mean(x) * jnp.mean(y)
  return 1.0 - cov / jnp.sqrt(jnp.var(x) * jnp.var(y))


def _mapped_corners(poses: jax.Array, pixel_to_image: jax.Array,
                    image_hw: tuple[int, int]) -> jax.Array:
  """(B, 6) pose vectors -> (B, 3, 4): the image's corner pixels mapped by each transform, mm.

  The corners are the TUS-REC baseline's `reference_image_points(image_size, 2)`: pixels (1, 1),
  (W, 1), (1, H), (W, H) 1-based, i.e. 0-based (0, 0), (W - 1, 0), (0, H - 1), (W - 1, H - 1),
  taken to image mm by each sample's `pixel_to_image` (B, 4, 4).
  """
  h, w = image_hw
  pixels = jnp.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [0] * 4, [1] * 4], jnp.float32)
  corners = pose.matmul(pixel_to_image.astype(jnp.float32), pixels)
  return pose.matmul(pose.pose_vector_to_matrix(poses.astype(jnp.float32)), corners)[:, :3]


def point_mse(pred: jax.Array, target: jax.Array, pixel_to_image: jax.Array,
              image_hw: tuple[int, int]) -> jax.Array:
  """The TUS-REC challenge baseline's loss: MSE of the image corners under the two transforms.

  As its train.py, `MSELoss(PredictionTransform(pred), LabelTransform(target))` with point labels:
  the mean over batch, x/y/z and the 4 corners of the squared coordinate differences (mm^2) of
  the corners mapped by the predicted and by the true frame-2-to-frame-1 transform. A change of
  image origin moves both mapped points alike, so the value does not depend on it: the corner
  frame of the challenge and the centred frame of the pose vectors give the same loss.

  Args:
    pred, target: (B, 6) pose vectors (translation mm, degrees).
    pixel_to_image: (B, 4, 4) 0-based pixel -> image mm of each sample's frame.
    image_hw: the frame's (height, width) in pixels.
  """
  diff = (_mapped_corners(pred, pixel_to_image, image_hw)
          - _mapped_corners(target, pixel_to_image, image_hw))
  return jnp.mean(jnp.square(diff))


def point_distance(pred: jax.Array, target: jax.Array, pixel_to_image: jax.Array,
                   image_hw: tuple[int, int]) -> jax.Array:
  """The challenge baseline's metric (`PointDistance`): the mean corner distance (mm)."""
  diff = (_mapped_corners(pred, pixel_to_image, image_hw)
          - _mapped_corners(target, pixel_to_image, image_hw))
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(diff), axis=1)))


def check_choice(config: ml_collections.ConfigDict, key: str, choices: tuple[str, ...],
                 experiment: str) -> str:
  """config.<key> ('a.b'), refused with a message naming the key unless one of `choices`."""
  value = config
  for part in key.split('.'):
    value = value.get(part) if value is not None else None
  if value not in choices:
    raise errors.InputError(f'config.{key}={value!r}: {experiment} takes one of '
                            f'{", ".join(choices)}')
  return value


def require_frames(num_frames: int, needed: int, what: str) -> None:
  """Refuses a sweep of fewer than `needed` frames; `what` names the file or item."""
  if num_frames < needed:
    raise errors.InputError(f'{what}: {num_frames} frame(s), fewer than the {needed} this model '
                            'needs')


def chunked(fn: Callable[[jax.Array], jax.Array], x: np.ndarray, chunk: int) -> np.ndarray:
  """fn over `x` in chunks of `chunk` rows, the last one zero-padded: one compiled shape."""
  out = []
  for start in range(0, len(x), chunk):
    part = x[start:start + chunk]
    padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
    out.append(np.asarray(fn(jnp.asarray(padded)))[:len(part)])
  return np.concatenate(out)


class SweepPrediction(common.SweepPrediction):
  """`predict_sweep` that first refuses sweep files shorter than the model's `min_frames`."""
  min_frames = 2

  def predict_sweep(self, variables, reader) -> np.ndarray:
    require_frames(reader.num_frames, self.min_frames, reader.path)
    return super().predict_sweep(variables, reader)


# GuoEtAlTrackingEstimator: everything under `model.`; Flax's 'layer1_0', 'downsample_0' and
# 'attention_1' are torch's 'layer1.0', 'downsample.0' and 'attention.1'.
DCLNET = (convert.Part((), 'model.', convert.Scheme(
    'dclnet', ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'conv2', 'bn2', 'conv3',
               'bn3', 'downsample', 'fc', 'attention'),
    ((r'(^|/)(layer\d|downsample|attention)_(\d+)(?=/|$)', r'\1\2/\3'),))),)
# Keys of the original's state dict that its forward never uses (ResNeXt's `conv2`, 2048 -> 128):
# dropped when converting a checkpoint, absent when exporting one.
DCLNET_UNUSED = ('model.conv2.weight', 'model.conv2.bias')


# NingEtAlModel: `backbone` is a VideoResnetTrackingEstimator whose video ResNet is its own
# `backbone`; its `fc` is unused (features_only=True).
HYBRID_TRANSFORMER = (
    convert.nest(convert.VIDEO_RESNET, ('backbone',), 'backbone.backbone.')
    + (convert.Part(('pos_emb',), 'pos_emb.', convert.PLAIN_SCHEME),
       convert.Part(('proj',), 'proj.', convert.PLAIN_SCHEME))
    + convert.nest(convert.BERT, ('transformer',), 'transformer.')
    + (convert.Part(('head',), 'head.', convert.PLAIN_SCHEME),))
HYBRID_TRANSFORMER_UNUSED = ('backbone.fc.weight', 'backbone.fc.bias')
