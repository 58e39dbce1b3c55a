"""SONICHU keypoint training as an experiment of `launch.train`: backbone plus nine heads.

Every training batch holds one task (`sonichu_jax.data.pipeline`), and one jitted step serves all
of them: the backbone runs once, then `lax.switch` on `batch['task'][0]` runs only that task's
head, whose (B, K, 2) soft-argmax keypoints are padded to (B, 22, 2); the loss is masked by
`visible`. The other heads are not run, so their gradients are exactly zero and their BatchNorm
statistics unchanged; the config's `optim.sparse_groups` (one group per head) then gives them no
update at all that step, as torch's AdamW skips parameters without `.grad`. The recipe and what
in it is assumed: docs/sonichu.md, section "Training".

Losses on normalised coordinates (x / W0, y / H0), averaged over the visible keypoints:
- 'l1': |dx| + |dy| (our assumption, as SONICHU's loss is unpublished: robust and close to MRE);
- 'radial': the Euclidean distance in original pixels, sqrt((dx W0)^2 + (dy H0)^2), which is the
  MRE itself (a tiny epsilon keeps its gradient finite at 0).
Optionally (`heatmap_weight` > 0) plus an auxiliary heatmap term (in the manner of DSNT's
regulariser): the KL divergence from a Gaussian of `heatmap_sigma` cells around the keypoint to
the soft-argmax's probability map. Its dense supervision lets a head find its keypoints within few
steps, where the coordinate loss alone moves the expectation slowly from the image centre.
No distillation term here: this is the loss on real (or synthetic) labels.

Evaluation runs every validation image once (optionally with flip TTA), maps keypoints back to
original pixels and reports `sonichu_jax.metrics.evaluate` (per-task MRE, weighted and unweighted
means, success rates, biometry), plus the trivial predictor a useful model must beat: each task's
mean normalised keypoints over the training records, as `baseline/mean_keypoints/mre/...`.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sonichu_jax import export as export_lib
from sonichu_jax import metrics
from sonichu_jax import plots
from sonichu_jax import preprocess
from sonichu_jax import tasks
from sonichu_jax.data import augment
from sonichu_jax.data import datasets
from sonichu_jax.data import fmuia
from sonichu_jax.data import pipeline
from sonichu_jax.models import heads as heads_lib
from sonichu_jax.models import sonichu
from ultrasound_common import errors

LOSSES = ('l1', 'radial')
MAX_KEYPOINTS = pipeline.MAX_KEYPOINTS
BASELINE = 'baseline/mean_keypoints/'
_RADIAL_EPS = 1e-12


@dataclasses.dataclass
class EvalResult:
  """What the runtime expects from `evaluate` (duck-typed: model packages never import launch):
  metrics and figures (per task, its first validation image with the predicted keypoints)."""
  metrics: dict[str, float]
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def head_name(task: str) -> str:
  """The variable collection key of a task's head, e.g. 'heads_HC'."""
  return f'heads_{task}'


def build_model(config: ml_collections.ConfigDict) -> sonichu.SonichuModel:
  """The SonichuModel of `config.model` (all nine heads) in `config.compute_dtype`."""
  m = config.model
  return sonichu.SonichuModel(
      tasks=tasks.TASK_NAMES, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, drop_path_rate=m.drop_path_rate,
      head_filters=m.head_filters, temperature=m.temperature,
      attention_implementation=m.get('attention_implementation', 'einsum'),
      deconv_implementation=m.get('deconv_implementation', 'subpixel'),
      dtype=jnp.dtype(config.compute_dtype))


def _pad(coords: jax.Array) -> jax.Array:
  """(B, K, 2) -> (B, MAX_KEYPOINTS, 2) with zeros beyond K."""
  return jnp.pad(coords, ((0, 0), (0, MAX_KEYPOINTS - coords.shape[1]), (0, 0)))


def heatmap_kl(logits: jax.Array, target: jax.Array, mask: jax.Array, temperature: float,
               sigma: float) -> jax.Array:
  """Mean over the masked keypoints of KL(Gaussian around the target || softmax(logits / T)).

  Args:
    logits: (B, h, w, K) heatmap logits.
    target: (B, K, 2) normalised (x, y); the Gaussian is centred on the cell coordinate x w - 0.5
      (the pixel-centre convention of the soft-argmax) with `sigma` cells of standard deviation.
    mask: (B, K) float weights.
    temperature: the soft-argmax temperature.
    sigma: Gaussian standard deviation in heatmap cells.
  """
  _, h, w, _ = logits.shape
  log_p = jax.nn.log_softmax(
      logits.astype(jnp.float32).reshape(logits.shape[0], h * w, -1) / temperature, axis=1)
  cx = target[:, None, None, :, 0] * w - 0.5
  cy = target[:, None, None, :, 1] * h - 0.5
  j = jnp.arange(w, dtype=jnp.float32)[None, None, :, None]
  i = jnp.arange(h, dtype=jnp.float32)[None, :, None, None]
  log_q = -((j - cx) ** 2 + (i - cy) ** 2) / (2.0 * sigma**2)
  log_q = jax.nn.log_softmax(log_q.reshape(log_p.shape), axis=1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=1)  # (B, K)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def keypoint_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, image_hw: jax.Array,
                  kind: str) -> jax.Array:
  """Mean over the masked keypoints of the per-keypoint loss `kind` (module docstring).

  Args:
    pred, target: (B, K, 2) normalised (x, y).
    mask: (B, K) float weights (visible and real rows).
    image_hw: (B, 2) original (H, W) (for 'radial').
    kind: one of LOSSES.
  """
  diff = pred.astype(jnp.float32) - target
  if kind == 'l1':
    per_point = jnp.sum(jnp.abs(diff), axis=-1)
  elif kind == 'radial':
    scale = image_hw[:, None, ::-1].astype(jnp.float32)  # (W0, H0) per image.
    per_point = jnp.sqrt(jnp.sum(jnp.square(diff * scale), axis=-1) + _RADIAL_EPS)
  else:
    raise errors.InputError(f'config.loss: unknown loss {kind!r}; expected one of {LOSSES}')
  return jnp.sum(per_point * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Experiment:
  """SONICHU keypoint training and evaluation; see `launch/experiment.py` for the protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True):
    """Builds the model and, unless `load_data` is False (prediction only), the records."""
    if config.loss not in LOSSES:
      raise errors.InputError(
          f'config.loss: unknown loss {config.loss!r}; expected one of {LOSSES}')
    self.config = config
    self.model = build_model(config)
    self._heads = [heads_lib.ViTPoseHead(t.num_keypoints, config.model.head_filters,
                                         dtype=self.model.dtype) for t in tasks.TASKS]
    self.train_records = self.val_records = None
    if load_data:
      self.train_records = datasets.load_split(config.data, 'train')
      self.val_records = datasets.load_split(config.data, 'val')
    self._baseline = None
    self._predict_padded = jax.jit(self.padded_keypoints, static_argnames=('tta',))

  @property
  def steps_per_epoch(self) -> int:
    return pipeline.steps_per_epoch(self.train_records, self.config.batch_size)

  def train_dataset(self, *, seed: int, shard_index: int, shard_count: int):
    return pipeline.train_batches(
        self.train_records, batch_size=self.config.batch_size, seed=seed,
        augment_config=augment.AugmentConfig(**self.config.data.augment),
        task_exponent=self.config.data.task_exponent, shard_index=shard_index,
        shard_count=shard_count)  # The trainer adds `config.num_workers` worker processes.

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    images = jnp.asarray(batch['image'][:1], self.model.dtype)
    return dict(self.model.init(rng, images, method=sonichu.SonichuModel.all_tasks))

  def _features(self, variables, images, *, train: bool, rng=None):
    return self.model.apply({'params': variables['params']}, images, train=train,
                            rngs=None if rng is None else {'dropout': rng},
                            method=lambda m, x, train: m.backbone(x, train=train))

  def _switch_heads(self, variables, features, task_index, *, train: bool):
    """Runs the head of `task_index` (traced) on features.

    Returns:
      (B, 22, 2) keypoints, (B, h, w, 22) heatmap logits (both zero-padded beyond K), and the
      batch_stats (only the active head's changed, in training).
    """
    params, stats = variables['params'], variables['batch_stats']

    def branch(i):
      name = head_name(tasks.TASK_NAMES[i])

      def run(params, stats, features):
        head_vars = {'params': params[name], 'batch_stats': stats[name]}
        if train:
          logits, updates = self._heads[i].apply(head_vars, features, train=True,
                                                 mutable=['batch_stats'])
          stats = {**stats, name: updates['batch_stats']}
        else:
          logits = self._heads[i].apply(head_vars, features)
        coords = _pad(heads_lib.soft_argmax(logits, self.model.temperature))
        logits = jnp.pad(logits, ((0, 0), (0, 0), (0, 0), (0, MAX_KEYPOINTS - logits.shape[-1])))
        return coords, logits.astype(jnp.float32), stats

      return run

    index = jnp.clip(jnp.asarray(task_index, jnp.int32), 0, len(tasks.TASKS) - 1)
    return jax.lax.switch(index, [branch(i) for i in range(len(tasks.TASKS))], params, stats,
                          features)

  def loss_fn(self, variables, batch, rng):
    loss, step_metrics, stats, _ = self.supervised_terms(variables, batch, rng)
    return loss, (step_metrics, {'batch_stats': stats})

  def supervised_terms(self, variables, batch, rng):
    """The train-mode forward and its loss on the batch's labels, for `loss_fn` and for
    experiments that add terms on the same prediction (distillation).

    Returns:
      (loss, metrics, the new batch_stats, the (B, 22, 2) predicted keypoints).
    """
    images = jnp.asarray(batch['image'], self.model.dtype)
    features = self._features(variables, images, train=True, rng=rng)
    # Batches hold one task (the pipeline guarantees it), so row 0 names the head.
    pred, logits, stats = self._switch_heads(variables, features, batch['task'][0], train=True)
    mask = batch['visible'].astype(jnp.float32) * batch['weight'][:, None]
    coordinate = keypoint_loss(pred, batch['keypoints'], mask, batch['image_hw'],
                               self.config.loss)
    heatmap = heatmap_kl(logits, batch['keypoints'], mask, self.model.temperature,
                         self.config.heatmap_sigma)
    loss = coordinate + self.config.heatmap_weight * heatmap
    scale = batch['image_hw'][:, None, ::-1].astype(jnp.float32)
    err = jnp.linalg.norm((pred - batch['keypoints']) * scale, axis=-1)
    mre = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {'keypoint_loss': coordinate, 'heatmap_kl': heatmap, 'mre_px': mre}, stats, pred

  def padded_keypoints(self, variables, images, task_index, tta: bool = False):
    """(B, 22, 2) normalised keypoints of one task's batch (inference; optional flip TTA)."""
    images = jnp.asarray(images, self.model.dtype)
    if not tta:
      return self._switch_heads(variables, self._features(variables, images, train=False),
                                task_index, train=False)[0]
    b = images.shape[0]
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    coords = self._switch_heads(variables, self._features(variables, both, train=False),
                                task_index, train=False)[0]
    # Mirror back per task: x -> 1 - x and the task's flip pairs swapped (padding rows unused).
    perms = np.tile(np.arange(MAX_KEYPOINTS), (len(tasks.TASKS), 1))
    for i, t in enumerate(tasks.TASKS):
      perms[i, :t.num_keypoints] = t.flip_permutation()
    perm = jnp.asarray(perms)[task_index]
    mirrored = coords[b:][:, perm]
    mirrored = jnp.stack([1.0 - mirrored[..., 0], mirrored[..., 1]], axis=-1)
    return 0.5 * (coords[:b] + mirrored)

  def predict_normalised(self, variables, images: np.ndarray, task: str) -> np.ndarray:
    """(B, 256, 256, 3) preprocessed images of `task` -> (B, K, 2) normalised keypoints."""
    spec = tasks.get_task(task)
    coords = self._predict_padded(variables, images, tasks.TASK_NAMES.index(spec.name),
                                  tta=bool(self.config.eval_tta))
    return np.asarray(coords, np.float64)[:, :spec.num_keypoints]

  def predict_image(self, variables, image: np.ndarray, task: str) -> dict[str, Any]:
    """Keypoints of one image in its own pixels and the task's measurements.

    Args:
      variables: the model's variables.
      image: (H, W) or (H, W, 3) uint8 (or float in [0, 1]), any size.
      task: a task name.

    Returns:
      'keypoints_px' (K, 2) (x, y) in original pixels, 'keypoints' (K, 2) normalised,
      'measurements' {name: value} (`sonichu_jax.metrics.measure`: pixels or degrees).
    """
    pixels, orig_hw = preprocess.preprocess(image)
    normalised = self.predict_normalised(variables, pixels[None], task)[0]
    keypoints_px = preprocess.to_pixels(normalised, orig_hw)
    measurements = {k: float(v) for k, v in metrics.measure(task, keypoints_px).items()}
    return dict(keypoints=normalised, keypoints_px=keypoints_px, measurements=measurements)

  def export_spec(self, variables, options) -> dict[str, Any]:
    """`launch.export`: [0, 1] images -> keypoints per task (sonichu_jax/export.py)."""
    return export_lib.keypoints_spec(self.model, variables, tuple(self.config.data.tasks),
                                     bool(self.config.eval_tta), options)

  def _mean_keypoints(self) -> dict[str, np.ndarray]:
    """Per task, the mean normalised keypoints of the training records (visible ones)."""
    out = {}
    for t in tasks.TASKS:
      records = [r for r in self.train_records if r.task == t.name]
      if not records:
        continue
      points = np.stack([preprocess.to_normalised(r.keypoints, r.image_hw) for r in records])
      visible = np.stack([r.visible for r in records])[..., None]
      out[t.name] = (np.sum(points * visible, axis=0)
                     / np.maximum(np.sum(visible, axis=0), 1))
    return out

  def evaluate(self, variables) -> EvalResult:
    batches = pipeline.eval_batches(self.val_records,
                                    batch_size=int(self.config.eval_batch_size))
    pred, index = {}, {}
    for batch in batches:
      task = pipeline.batch_task(batch)
      real = batch['weight'] > 0
      coords = self.predict_normalised(variables, batch['image'], task)[real]
      hw = batch['image_hw'][real]
      pred.setdefault(task, []).append(coords * hw[:, None, ::-1])
      index.setdefault(task, []).append(batch['index'][real])
    pred = {k: np.concatenate(v) for k, v in pred.items()}
    records = {k: [self.val_records[i] for i in np.concatenate(v)] for k, v in index.items()}
    target = {k: np.stack([r.keypoints for r in rs]) for k, rs in records.items()}
    visible = {k: np.stack([r.visible for r in rs]) for k, rs in records.items()}
    result = metrics.evaluate(pred, target, visible)
    if self._baseline is None:
      means = self._mean_keypoints()
      missing = sorted(set(target) - set(means))
      if missing:
        raise errors.InputError(f'config.data: validation tasks {missing} have no training records')
      baseline_pred = {k: np.stack([preprocess.to_pixels(means[k], r.image_hw) for r in rs])
                       for k, rs in records.items()}
      summary = metrics.evaluate(baseline_pred, target, visible)
      self._baseline = {f'{BASELINE}{k}': v for k, v in summary.items() if k.startswith('mre/')}
    figures = {}
    for task, points in pred.items():
      record = records[task][0]
      measured = {k: float(v) for k, v in metrics.measure(task, points[0]).items()}
      figures[f'keypoints/{task}'] = plots.keypoint_overlay(
          fmuia.read_image(record), points[0], task, measured, title='predicted keypoints')
    return EvalResult(metrics={**result, **self._baseline}, figures=figures)
