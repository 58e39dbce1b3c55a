"""I-JEPA pretraining of SONICHU's backbone as an experiment of `launch.train`.

Variables: 'params' {'encoder': the context encoder (SONICHU's backbone tree), 'predictor'}, and
'target' {'encoder': the target encoder, 'step': the number of train steps done}, a non-param
collection that `loss_fn` returns updated, so the EMA needs no trainer hook.

EMA order. The original (`src/train.py`) runs, in step t: forward with target weights T_t, backward,
optimiser step (params P_t -> P_{t+1}), then T_{t+1} = m_t T_t + (1 - m_t) P_{t+1} with m_t the
t-th value of its momentum generator, m_t = m0 + t (m1 - m0) / total_steps. `loss_fn` of step t
receives P_t (the params after step t-1's update) and the stored T_{t-1}, and first applies step
t-1's EMA, T_t = m_{t-1} T_{t-1} + (1 - m_{t-1}) P_t (none at t = 0), before computing the targets:
exactly the original's sequence, with the update of the last step left pending in the saved state
(`target_encoder` applies it; evaluation uses that). The params enter the EMA under stop_gradient:
the target encoder is never differentiated.

Frozen teacher (SALT, the recipe US-JEPA uses): with `config.frozen_target.workdir` set, the EMA
is off and the target encoder is the encoder of another run, read once (`read_encoder`) and
never updated: an I-JEPA run's target encoder (also a converted official checkpoint,
`launch.convert --model=ijepa`), or the backbone of a keypoint run (`params/backbone`). It stays in
the 'target' collection (whose step still counts the steps; nothing is pending), and so is saved
with every checkpoint: the jitted step takes only the train state and the batch, and weights
closed over would be compiled into the program as constants; a resume continues with the saved
teacher (the folder is still read at start-up, where `init` is traced, to check it). `init`
fetches the weights with a host callback, for the same reason.

Data: `config.data.dataset` 'synthetic' (the built-in synthetic scenes, `sonichu_jax.data.
ijepa_pipeline.synthetic_pool`) or a folder whose `train/` and `val/` hold image files, e.g. an
FM_UIA data folder (`folder_images`; at most `data.max_val_images` validation images).

Evaluation: the loss on the whole validation images with fixed masks (and the loss of predicting
zeros, a baseline a useful predictor beats), the target features' per-dimension std (collapse
shows as a fall towards 0) and, as figures, validation images with their context patches (green)
and target blocks (outlined).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sonichu_jax import preprocess
from sonichu_jax.data import ijepa_masks
from sonichu_jax.data import ijepa_pipeline
from sonichu_jax.models import ijepa
from ultrasound_common import checkpoints
from ultrasound_common import errors

MASK_KEYS = ('context_index', 'context_valid', 'target_index', 'target_valid')
# Target block outline colours (RGB), block m gets _COLOURS[m % 4].
_COLOURS = np.array([[230, 60, 60], [60, 120, 255], [250, 210, 40], [220, 70, 220]], np.uint8)


@dataclasses.dataclass
class EvalResult:
  """What the runtime expects from `evaluate` (duck-typed: model packages never import launch)."""
  metrics: dict[str, float]
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def mask_config(config: ml_collections.ConfigDict) -> ijepa_masks.MaskConfig:
  """The MaskConfig of `config.masks` on the model's token grid."""
  grid = config.data.image_size // config.model.patch_size
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in config.masks.to_dict().items()}
  try:
    return ijepa_masks.MaskConfig(grid=(grid, grid), **fields)
  except TypeError as e:
    raise errors.InputError(f'config.masks: {e}') from e


def build_model(config: ml_collections.ConfigDict) -> ijepa.IJepa:
  """The IJepa module of `config.model` and `config.predictor` in `config.compute_dtype`."""
  m, p = config.model, config.predictor
  kw = dict(dtype=jnp.dtype(config.compute_dtype))
  grid = config.data.image_size // m.patch_size
  encoder = ijepa.MaskedEncoder(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, **kw)
  predictor = ijepa.Predictor(grid=(grid, grid), embed_dim=m.embed_dim, predictor_dim=p.dim,
                              depth=p.depth, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, **kw)
  return ijepa.IJepa(encoder, predictor)


def momentum(step: jax.Array, total_steps: int, ema: tuple[float, float]) -> jax.Array:
  """The original's momentum of step `step`: m0 + step (m1 - m0) / total_steps (clipped)."""
  i = jnp.clip(jnp.asarray(step), 0, total_steps).astype(jnp.float32)
  return ema[0] + i * ((ema[1] - ema[0]) / total_steps)


def ema_update(target: Any, params: Any, step: jax.Array, total_steps: int,
               ema: tuple[float, float]) -> tuple[Any, jax.Array]:
  """(target encoder after step `step` - 1's EMA, the momentum used); unchanged at step 0."""
  m = momentum(step - 1, total_steps, ema)
  done = jnp.asarray(step) > 0
  new = jax.tree.map(lambda t, p: jnp.where(done, m * t + (1.0 - m) * jax.lax.stop_gradient(p), t),
                     target, params)
  return new, m


_MODEL_KEYS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')


def read_encoder(path: str, checkpoint: str, template: Any, *, key: str) -> dict[str, np.ndarray]:
  """A run's encoder as NumPy: an I-JEPA run's target encoder, or a keypoint run's backbone.

  Used for the frozen target (`config.frozen_target`, module docstring) and by the feature probe.

  Args:
    path: a run folder or a step folder.
    checkpoint: 'best' (the best, else the latest), 'latest' or a step number.
    template: the encoder's parameters (arrays or shapes) that the weights must match.
    key: what names `path` in errors, e.g. "config.frozen_target.workdir='runs/a'".

  Raises:
    InputError or MissingFileError naming `key`: no checkpoint there, no encoder in it, or an
      encoder of another architecture.
  """
  try:
    variables = checkpoints.read_variables(path, checkpoint)
    source = checkpoints.read_config(path, checkpoint)
  except FileNotFoundError as e:
    raise errors.MissingFileError(f'{key}: {e}') from None
  except ValueError as e:
    raise errors.InputError(f'{key}: {e}') from None
  if 'encoder' in variables.get('target', {}):
    encoder, where = variables['target']['encoder'], 'target/encoder'
  elif 'backbone' in variables.get('params', {}):
    encoder, where = variables['params']['backbone'], 'params/backbone'
  else:
    raise errors.InputError(
        f'{key}: the checkpoint ({source.get("experiment")}) has neither a target encoder '
        f"('target/encoder') nor a backbone ('params/backbone'); collections: "
        f'{ {k: sorted(v) for k, v in variables.items()} }')
  want = jax.tree_util.tree_flatten_with_path(template)[0]
  got = jax.tree_util.tree_flatten_with_path(encoder)[0]
  if [(p, tuple(x.shape)) for p, x in got] != [(p, tuple(x.shape)) for p, x in want]:
    theirs = source.get('model', {})
    differ = {k: theirs.get(k) for k in _MODEL_KEYS if k in theirs}
    shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in got}
    raise errors.InputError(
        f'{key}: its encoder ({where}) is of another architecture than config.model (and '
        f'config.data.image_size); its config.model: {differ}; first tensors: '
        f'{dict(list(shapes.items())[:3])}')
  return jax.tree.map(lambda x: np.asarray(x, np.float32), encoder)


def steps_per_epoch_of(config: ml_collections.ConfigDict, num_images: int | None = None) -> int:
  """Optimiser steps per epoch: the training images over the batch (at least 1). Without
  `num_images`, synthetic data counts `data.synthetic.num_train` and a folder is listed."""
  if num_images is None:
    num_images = (config.data.synthetic.num_train if config.data.dataset == 'synthetic'
                  else len(ijepa_pipeline.folder_images(config.data.dataset, 'train')))
  return max(num_images // config.batch_size, 1)


class Experiment:
  """I-JEPA pretraining; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    self.config = config
    self.model = build_model(config)
    self.masks = mask_config(config)
    ijepa_pipeline.check_grid(config.data.image_size, config.model.patch_size, self.masks)
    self.ema = tuple(float(x) for x in config.ema)
    frozen = config.get('frozen_target', None)
    self.frozen_target = frozen if frozen is not None and frozen.get('workdir') else None
    self._frozen_weights = None
    self.train_images = self.val_images = None
    if load_data and config.data.dataset == 'synthetic':
      s = config.data.synthetic
      self.train_images = ijepa_pipeline.synthetic_pool(
          s.num_train, seed=s.seed, split='train', image_hw=tuple(s.image_hw))
      self.val_images = ijepa_pipeline.synthetic_pool(
          s.num_val, seed=s.seed, split='val', image_hw=tuple(s.image_hw))
    elif load_data:
      self.train_images = ijepa_pipeline.folder_images(config.data.dataset, 'train')
      self.val_images = ijepa_pipeline.folder_images(
          config.data.dataset, 'val', limit=int(config.data.max_val_images), seed=config.seed)
    self._eval_fn = jax.jit(self._eval_step)

  @property
  def steps_per_epoch(self) -> int:
    return steps_per_epoch_of(self.config, None if self.train_images is None
                              else len(self.train_images))

  @property
  def total_steps(self) -> int:
    """The run's optimiser steps, as the trainer counts them (the momentum schedule's length)."""
    c = self.config
    return int(c.get('total_steps') or int(c.num_epochs * self.steps_per_epoch))

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return ijepa_pipeline.train_batches(
        self.train_images, batch_size=self.config.batch_size, seed=seed,
        image_size=self.config.data.image_size, mask_config=self.masks,
        crop_scale=tuple(self.config.data.crop_scale), shard_index=shard_index,
        shard_count=shard_count)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    inputs = [jnp.asarray(batch[k][:1]) for k in MASK_KEYS]
    images = jnp.asarray(batch['image'][:1], self.model.encoder.dtype)
    params = self.model.init(rng, images, *inputs)['params']
    if self.frozen_target is None:
      # The original's target encoder starts as a deep copy of the context encoder.
      encoder = jax.tree.map(jnp.copy, params['encoder'])
    else:
      if self._frozen_weights is None:  # Read (and checked) while tracing: before any step.
        with jax.ensure_compile_time_eval():  # Orbax's restore needs concrete arrays.
          self._frozen_weights = read_encoder(
              str(self.frozen_target.workdir), str(self.frozen_target.get('checkpoint', 'best')),
              params['encoder'], key=f'config.frozen_target.workdir={self.frozen_target.workdir!r}')
      weights = self._frozen_weights
      encoder = jax.pure_callback(
          lambda: weights, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), weights))
    return {'params': params, 'target': {'encoder': encoder, 'step': jnp.zeros((), jnp.int32)}}

  def target_encoder(self, variables) -> Any:
    """The target encoder with the pending EMA update of the last step applied (a frozen target
    as it is)."""
    target = variables['target']
    if self.frozen_target is not None:
      return target['encoder']
    return ema_update(target['encoder'], variables['params']['encoder'], target['step'],
                      self.total_steps, self.ema)[0]

  def loss_fn(self, variables, batch, rng):
    del rng  # No stochastic layers.
    params, target = variables['params'], variables['target']
    images = jnp.asarray(batch['image'], self.model.encoder.dtype)
    if self.frozen_target is None:
      encoder, m = ema_update(target['encoder'], params['encoder'], target['step'],
                              self.total_steps, self.ema)
    else:
      encoder = target['encoder']
    loss, aux = ijepa.ijepa_loss(self.model, params, encoder, images,
                                 *[batch[k] for k in MASK_KEYS])
    metrics = {'target_std': aux['target_std'],
               'zero_prediction_loss': aux['zero_prediction_loss'],
               'context_tokens': jnp.mean(jnp.sum(batch['context_valid'], axis=-1))}
    if self.frozen_target is None:
      metrics['ema_momentum'] = m
    return loss, (metrics, {'target': {'encoder': encoder, 'step': target['step'] + 1}})

  def _eval_step(self, variables, batch):
    images = jnp.asarray(batch['image'], self.model.encoder.dtype)
    loss, aux = ijepa.ijepa_loss(self.model, variables['params'], self.target_encoder(variables),
                                 images, *[batch[k] for k in MASK_KEYS])
    return {'loss': loss, **aux}

  def evaluate(self, variables) -> EvalResult:
    batch = ijepa_pipeline.eval_batch(self.val_images, image_size=self.config.data.image_size,
                                      mask_config=self.masks, seed=self.config.seed)
    values = {k: float(v) for k, v in jax.device_get(self._eval_fn(variables, batch)).items()}
    shown = int(self.config.get('num_eval_figures', 4))
    figures = {f'masks/val_{i}': mask_figure(batch, i, self.masks.grid)
               for i in range(min(shown, len(self.val_images)))}
    return EvalResult(metrics=values, figures=figures)


def mask_figure(batch: dict[str, np.ndarray], i: int, grid: tuple[int, int],
                min_side: int = 256) -> np.ndarray:
  """(H, W, 3) uint8: image i, its context patches tinted green, its target blocks outlined."""
  grey = batch['image'][i][..., 0] * preprocess.IMAGENET_STD[0] + preprocess.IMAGENET_MEAN[0]
  zoom = max(1, -(-min_side // grey.shape[0]))
  grey = np.kron(np.clip(grey, 0.0, 1.0), np.ones((zoom, zoom)))
  rgb = np.repeat((grey * 255.0)[..., None], 3, axis=-1)
  ph, pw = rgb.shape[0] // grid[0], rgb.shape[1] // grid[1]
  for index in batch['context_index'][i][batch['context_valid'][i]]:
    r, c = divmod(int(index), grid[1])
    cell = rgb[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
    cell[:] = 0.6 * cell + 0.4 * np.array([40.0, 200.0, 80.0])
  t = max(1, ph // 8)
  for m, (index, valid) in enumerate(zip(batch['target_index'][i], batch['target_valid'][i])):
    rows, cols = np.divmod(index[valid].astype(int), grid[1])
    if not len(rows):
      continue
    top, bottom = rows.min() * ph, (rows.max() + 1) * ph
    left, right = cols.min() * pw, (cols.max() + 1) * pw
    colour = _COLOURS[m % len(_COLOURS)]
    rgb[top:top + t, left:right] = colour
    rgb[bottom - t:bottom, left:right] = colour
    rgb[top:bottom, left:left + t] = colour
    rgb[top:bottom, right - t:right] = colour
  return np.round(rgb).astype(np.uint8)
