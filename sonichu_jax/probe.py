r"""A frozen-feature probe of SONICHU's backbone: ridge regression of keypoints from patch features.

    python -m sonichu_jax.probe --config=configs/sonichu/keypoints.py:sim \
        (--encoder=RUN [--checkpoint=latest] | --random_seed=N) --out=probe.json

Do a pretrained encoder's features, frozen, say where the keypoints are? The probe answers without
any training of the network: the backbone of `--config`'s model (its weights from `--encoder`, the
target encoder of an I-JEPA run or the backbone of a keypoint run, else a random initialisation
with `--random_seed`) encodes every training and validation image of `--config.data` once
(evaluation preprocessing, no augmentation); then, per task, a linear map from the concatenated
patch features (h * w * C numbers) to the task's normalised keypoints is fitted on the training
images and scored on the validation images with the keypoint metrics (`sonichu_jax.metrics`: MRE
weighted and unweighted, in original pixels).

The fit is the same for every encoder, so that probes compare encoders and nothing else: features
standardised per task, an unpenalised intercept, and one ridge penalty per task chosen from a
fixed grid (`RELATIVE_PENALTIES` times the mean eigenvalue of the features' Gram matrix) by the
exact leave-one-out error on the training images (for ridge regression it is closed-form, from one
eigendecomposition of the n x n Gram matrix). A keypoint is fitted and scored on the images where
it is visible. The JSON written to `--out` holds the metrics, the penalty chosen per task and the
mean-keypoints predictor's metrics (the probe's floor: an infinite penalty).
"""
from collections.abc import Sequence
import os
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from sonichu_jax import metrics
from sonichu_jax import preprocess
from sonichu_jax.data import datasets
from sonichu_jax.data import pipeline
from sonichu_jax.experiments import ijepa as ijepa_experiment
from sonichu_jax.experiments import keypoints
from ultrasound_common import errors
from ultrasound_common import files

RELATIVE_PENALTIES = tuple(10.0 ** k for k in range(-4, 4))


def features(encode, variables, records, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(n, h * w * C) frozen patch features of `records` and their record indices, in record order.

  `encode(params, images)` is the jitted backbone (`run_probe` builds it once for both splits).
  """
  out, index = [], []
  for batch in pipeline.eval_batches(records, batch_size=batch_size):
    real = batch['weight'] > 0
    tokens = np.asarray(encode(variables['params'], batch['image']), np.float64)[real]
    out.append(tokens.reshape(tokens.shape[0], -1))
    index.append(batch['index'][real])
  index = np.concatenate(index)
  order = np.argsort(index)
  return np.concatenate(out)[order], index[order]


def ridge_loo(x: np.ndarray, y: np.ndarray, penalties: Sequence[float]) -> np.ndarray:
  """Leave-one-out residuals of ridge regression with an unpenalised intercept, per penalty.

  Args:
    x: (n, d) features; y: (n, m) targets.
    penalties: absolute ridge penalties.

  Returns:
    (len(penalties), n, m) residuals y_i - f_{-i}(x_i), exact (the hat-matrix identity
    e_i / (1 - H_ii), where H includes the intercept's 11^T / n).
  """
  n = x.shape[0]
  xc = x - x.mean(axis=0)
  s, u = np.linalg.eigh(xc @ xc.T)
  s = np.maximum(s, 0.0)
  yc = y - y.mean(axis=0)
  out = []
  for lam in penalties:
    shrink = s / (s + lam)
    fitted = y.mean(axis=0) + u @ (shrink[:, None] * (u.T @ yc))
    leverage = 1.0 / n + np.einsum('ij,j,ij->i', u, shrink, u)
    out.append((y - fitted) / (1.0 - leverage)[:, None])
  return np.stack(out)


def ridge_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, penalty: float) -> np.ndarray:
  """Ridge regression (unpenalised intercept) fitted on (x, y), evaluated at `x_new`: (n_new, m)."""
  mean = x.mean(axis=0)
  xc = x - mean
  gram = xc @ xc.T
  alpha = np.linalg.solve(gram + penalty * np.eye(len(x)), y - y.mean(axis=0))
  return y.mean(axis=0) + (x_new - mean) @ (xc.T @ alpha)


def _standardise(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 1e-12, std, 1.0)
  return (train - mean) / std, (other - mean) / std


def probe_task(x_train: np.ndarray, y_train: np.ndarray, visible_train: np.ndarray,
               x_val: np.ndarray) -> tuple[np.ndarray, float]:
  """One task's probe: (n_val, K, 2) normalised predictions and the chosen relative penalty.

  Args:
    x_train, x_val: (n, d) features; y_train: (n, K, 2) normalised keypoints; visible_train: (n, K).
  """
  x_train, x_val = _standardise(x_train, x_val)
  num_keypoints = y_train.shape[1]
  scale = np.sum(np.square(x_train - x_train.mean(axis=0))) / len(x_train)  # Mean Gram eigenvalue.
  penalties = [r * max(scale, 1e-12) for r in RELATIVE_PENALTIES]
  loo = np.zeros(len(penalties))
  for k in range(num_keypoints):
    rows = visible_train[:, k]
    if rows.sum() >= 3:
      loo += np.sum(ridge_loo(x_train[rows], y_train[rows, k], penalties) ** 2, axis=(1, 2))
  best = int(np.argmin(loo))
  pred = np.zeros((len(x_val), num_keypoints, 2))
  for k in range(num_keypoints):
    rows = visible_train[:, k]
    if rows.sum() == 0:
      continue  # Never visible in training: predicted at 0, as a model without data would be.
    pred[:, k] = ridge_predict(x_train[rows], y_train[rows, k], x_val, penalties[best])
  return pred, RELATIVE_PENALTIES[best]


def _labels(records) -> tuple[np.ndarray, np.ndarray]:
  points = np.stack([preprocess.to_normalised(r.keypoints, r.image_hw) for r in records])
  return points, np.stack([r.visible for r in records])


def run_probe(config: ml_collections.ConfigDict, variables, *, batch_size: int = 16
              ) -> dict[str, Any]:
  """Probes `variables`' backbone on `config.data` (module docstring); returns the JSON dict."""
  model = keypoints.build_model(config)
  train_records = datasets.load_split(config.data, 'train')
  val_records = datasets.load_split(config.data, 'val')
  encode = jax.jit(lambda params, images: model.apply(
      {'params': params}, images.astype(model.dtype), method=lambda m, x: m.backbone(x)))
  x_train, i_train = features(encode, variables, train_records, batch_size)
  x_val, i_val = features(encode, variables, val_records, batch_size)
  train = [train_records[i] for i in i_train]
  val = [val_records[i] for i in i_val]
  pred, floor, target, visible, penalties = {}, {}, {}, {}, {}
  for task in sorted({r.task for r in val}):
    rows_t = np.array([r.task == task for r in train])
    rows_v = np.array([r.task == task for r in val])
    if not rows_t.any():
      raise errors.InputError(f'config.data: validation task {task} has no training records')
    y, vis = _labels([r for r, keep in zip(train, rows_t) if keep])
    task_val = [r for r, keep in zip(val, rows_v) if keep]
    normalised, penalties[task] = probe_task(x_train[rows_t], y, vis, x_val[rows_v])
    mean = np.sum(y * vis[..., None], axis=0) / np.maximum(vis.sum(axis=0), 1)[:, None]
    pred[task] = np.stack([preprocess.to_pixels(p, r.image_hw)
                           for p, r in zip(normalised, task_val)])
    floor[task] = np.stack([preprocess.to_pixels(mean, r.image_hw) for r in task_val])
    target[task] = np.stack([r.keypoints for r in task_val])
    visible[task] = np.stack([r.visible for r in task_val])
  return dict(metrics=metrics.evaluate(pred, target, visible),
              mean_keypoints=metrics.evaluate(floor, target, visible),
              relative_penalty=penalties, feature_dims=int(x_train.shape[1]),
              images=dict(train=len(train), val=len(val)))


def probe_variables(config: ml_collections.ConfigDict, *, encoder: str | None = None,
                    checkpoint: str = 'latest', random_seed: int = 0) -> dict[str, Any]:
  """{'params': {'backbone': ...}} of `config.model`: the encoder of the run `encoder` (an I-JEPA
  run's target encoder, or a keypoint run's backbone) if given, else initialised with
  `random_seed`."""
  model = keypoints.build_model(config)
  shape = (1, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE, 3)
  init = jax.jit(lambda rng: model.init(rng, np.zeros(shape, model.dtype),
                                        method=lambda m, x: m.backbone(x)))
  weights = init(jax.random.key(random_seed))['params']['backbone']
  if encoder:
    weights = ijepa_experiment.read_encoder(encoder, checkpoint, weights,
                                            key=f'--encoder={encoder!r}')
  return {'params': {'backbone': weights}}


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'A keypoint config file[:arg] (the model and '
                                  'the data probed).', lock_config=False)
  flags.DEFINE_string('encoder', None, "A run whose encoder is probed: an I-JEPA run's target "
                      "encoder, or a keypoint run's backbone.")
  flags.DEFINE_string('checkpoint', 'latest', "--encoder's checkpoint: 'latest', 'best' or a "
                      'step number.')
  flags.DEFINE_integer('random_seed', None, 'Without --encoder: probe a random backbone of this '
                       'initialisation seed.')
  flags.DEFINE_string('out', None, 'The JSON file written.')
  flags.DEFINE_integer('batch_size', 16, 'Images per encoder batch.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.config is None or not f.out or (f.encoder is None) == (f.random_seed is None):
    raise app.UsageError('--config, --out and one of --encoder or --random_seed are required')
  variables = probe_variables(f.config, encoder=f.encoder, checkpoint=f.checkpoint,
                              random_seed=f.random_seed or 0)
  result = run_probe(f.config, variables, batch_size=f.batch_size)
  result['encoder'] = (dict(run=os.path.abspath(f.encoder), checkpoint=f.checkpoint) if f.encoder
                       else dict(random_seed=f.random_seed))
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  files.write_json(f.out, result, indent=2, sort_keys=True)
  m = result['metrics']
  print(f"probe: mre/weighted {m['mre/weighted']:.2f} px, mre/unweighted "
        f"{m['mre/unweighted']:.2f} px (mean keypoints: "
        f"{result['mean_keypoints']['mre/weighted']:.2f} px); wrote {f.out}")


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'sonichu_jax.probe')
