"""Tests of the SONICHU keypoint experiment and of the optimiser's sparse groups it relies on.

A train step on a one-task batch must change only that task's head: the other heads' parameters,
BatchNorm statistics and optimiser state stay bit-identical (torch's AdamW skips parameters with no
`.grad`). Evaluation must report the FM_UIA metrics of the model's predictions and the
mean-keypoints baseline, both checked against direct computations.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch import config_utils
from launch import optim
from launch import trainer
from sonichu_jax import metrics
from sonichu_jax import preprocess
from sonichu_jax import tasks
from sonichu_jax.data import fmuia
from sonichu_jax.data import pipeline
from sonichu_jax.data import synthetic
from sonichu_jax.experiments import keypoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'sonichu', 'keypoints.py')
EVAL_TASKS = ('HC', 'fetal_femur')


def _adamw(p, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW on one tensor, in float64: decay, then the bias-corrected Adam step."""
  m = v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return p


def test_sparse_groups_skip_unused_heads_like_torch():
  params = {'trunk': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)},
            'heads_a': {'kernel': jnp.ones(2)}, 'heads_b': {'kernel': jnp.ones(2)}}
  config = {'lr': 0.1, 'weight_decay': 0.5, 'schedule': 'linear_warmup_cosine',
            'sparse_groups': (r'heads_(\w+)/.*',), 'no_decay': ('.*/bias',)}
  tx, schedule = optim.make_optimizer(config, total_steps=6, warmup_steps=2)
  lrs = [float(schedule(k)) for k in range(3)]
  assert lrs[:2] == pytest.approx([0.05, 0.1])  # Linear warmup from lr / W.
  g = {'trunk': {'kernel': jnp.full(3, 0.3), 'bias': jnp.full(3, 0.3)},
       'heads_a': {'kernel': jnp.full(2, 0.2)}, 'heads_b': {'kernel': jnp.zeros(2)}}
  g_b = {**g, 'heads_a': {'kernel': jnp.zeros(2)}, 'heads_b': {'kernel': jnp.full(2, -0.4)}}
  state = tx.init(params)
  p = params
  for grads in (g, g, g_b):  # Head b is unused in steps 0 and 1, head a in step 2.
    updates, new_state = tx.update(grads, state, p)
    if grads is g:
      # Head b's whole optimiser state is untouched in a step without its gradient.
      for path, old in jax.tree_util.tree_leaves_with_path(state):
        if "'0:b'" in jax.tree_util.keystr(path):
          new = dict(jax.tree_util.tree_leaves_with_path(new_state))[path]
          np.testing.assert_array_equal(new, old)
    state, p = new_state, optax.apply_updates(p, updates)
  # trunk/kernel: three AdamW steps at the global schedule; trunk/bias: the same without decay.
  np.testing.assert_allclose(p['trunk']['kernel'], _adamw(np.ones(3), [0.3] * 3, lrs, 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(p['trunk']['bias'], _adamw(np.ones(3), [0.3] * 3, lrs, 0.0),
                             rtol=1e-5)
  # Head a: its two steps, then nothing (no decay at step 2).
  np.testing.assert_allclose(p['heads_a']['kernel'], _adamw(np.ones(2), [0.2] * 2, lrs[:2], 0.5),
                             rtol=1e-5)
  # Head b: ONE step with a fresh bias correction (its own count is 1) at the global step-2 lr.
  np.testing.assert_allclose(p['heads_b']['kernel'], _adamw(np.ones(2), [-0.4], lrs[2:], 0.5),
                             rtol=1e-5)


def test_sparse_and_no_decay_patterns_must_match():
  params = {'heads_a': {'kernel': jnp.ones(2)}}
  for key, value in (('sparse_groups', ('head_(\\w+)/.*',)), ('no_decay', ('.*/bias',))):
    tx, _ = optim.make_optimizer({'lr': 0.1, 'schedule': 'constant', key: value},
                                 total_steps=2, warmup_steps=0)
    with pytest.raises(ValueError, match=f'config.optim.{key}: pattern .* matches no parameter'):
      tx.init(params)


def _tiny_config(cache_dir):
  config = config_utils.load_config_file(f'{CONFIG}:sim')
  config.data.synthetic.cache_dir = str(cache_dir)
  config.data.synthetic.num_train = 2
  config.data.synthetic.num_val = 2
  config.data.tasks = EVAL_TASKS
  config.model.embed_dim = 16
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.head_filters = 8
  config.batch_size = 2
  config.eval_batch_size = 1
  return config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny experiment on two tasks of synthetic data, its optimiser and a random initial state.

  Random variables of the model's shapes (uniform in +-0.2, unit BatchNorm variances) instead of
  `init` (whose compilation takes tens of seconds on a busy CPU): the heads' N(0, 0.001) init
  would put every keypoint at the image centre, which would hide errors of TTA and evaluation.
  """
  config = _tiny_config(tmp_path_factory.mktemp('sonichu_cache'))
  experiment = keypoints.Experiment(config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps=10, warmup_steps=2,
                                      frozen=tuple(config.frozen))
  batch = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
  shapes = jax.eval_shape(experiment.init, jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if jax.tree_util.keystr(path).endswith("['var']")
                       else rng.uniform(-0.2, 0.2, s.shape).astype(s.dtype)), shapes)
  variables = jax.tree.map(jnp.asarray, variables)
  state = {'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key(1), 'variables': variables,
           'opt_state': tx.init(variables['params'])}
  return config, experiment, tx, schedule, state, batch


def _leaves(state):
  """Host copies of the state's arrays by path (the RNG key aside)."""
  tree = {k: v for k, v in state.items() if k != 'rng'}
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow  # Compiling the train step takes 30-70 s on a busy 2-core CPU.
def test_train_step_updates_only_the_active_head(setup):
  config, experiment, tx, schedule, state, batch = setup
  task = pipeline.batch_task(batch)
  before = _leaves(state)
  step = jax.jit(trainer.make_train_step(experiment, tx, schedule, tuple(config.frozen)))
  new_state, step_metrics = step(jax.tree.map(jnp.copy, state), batch)
  after = _leaves(new_state)
  active = keypoints.head_name(task)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  for name in tasks.TASK_NAMES:
    head = f"'{keypoints.head_name(name)}'"
    head_keys = {k for k in before if head in k or f"'0:{name}'" in k}
    assert head_keys, name
    if keypoints.head_name(name) == active:
      # Parameters, BatchNorm statistics and Adam moments of the active head all move.
      assert any("['params']" in k for k in head_keys & changed)
      assert any("['batch_stats']" in k for k in head_keys & changed)
      assert any('opt_state' in k for k in head_keys & changed)
    else:
      assert not head_keys & changed, sorted(head_keys & changed)[:3]
  assert any("['backbone']" in k and "['params']" in k for k in changed)
  # The frozen position table does not move.
  assert not any('pos_embed' in k for k in changed)
  assert np.isfinite(float(step_metrics['loss']))


def test_loss_kinds_and_padding_mask():
  pred = jnp.array([[[0.5, 0.5], [0.2, 0.1], [0.9, 0.9]]])
  target = jnp.array([[[0.6, 0.3], [0.2, 0.1], [0.0, 0.0]]])
  mask = jnp.array([[1.0, 1.0, 0.0]])  # The third keypoint is padding.
  hw = jnp.array([[200, 100]])  # H = 200, W = 100.
  l1 = keypoints.keypoint_loss(pred, target, mask, hw, 'l1')
  assert float(l1) == pytest.approx((0.1 + 0.2 + 0.0) / 2, rel=1e-6)
  radial = keypoints.keypoint_loss(pred, target, mask, hw, 'radial')
  # The MRE in original pixels: dx 0.1 * 100 = 10, dy 0.2 * 200 = 40.
  assert float(radial) == pytest.approx(np.hypot(10.0, 40.0) / 2, rel=1e-5)
  with pytest.raises(ValueError, match='config.loss'):
    keypoints.keypoint_loss(pred, target, mask, hw, 'l2')


def test_heatmap_kl_against_numpy():
  rng = np.random.default_rng(0)
  h, w, temperature, sigma = 6, 8, 0.5, 1.5
  logits = rng.standard_normal((1, h, w, 2)).astype(np.float32)
  target = np.array([[[0.3, 0.6], [0.9, 0.1]]], np.float32)
  mask = np.array([[1.0, 0.0]], np.float32)
  # Keypoint 0 by hand: the Gaussian over the cell centres ((j + 0.5) / w, (i + 0.5) / h).
  x, y = target[0, 0]
  jj, ii = np.meshgrid(np.arange(w), np.arange(h))
  q = np.exp(-(((jj + 0.5) / w - x) ** 2 * w**2 + ((ii + 0.5) / h - y) ** 2 * h**2)
             / (2 * sigma**2))
  q /= q.sum()
  z = logits[0, :, :, 0].astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  want = float(np.sum(q * np.log(q / p)))
  got = keypoints.heatmap_kl(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(mask),
                             temperature, sigma)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Logits equal to T log q give zero divergence.
  perfect = np.zeros((1, h, w, 2), np.float32)
  perfect[0, :, :, 0] = temperature * np.log(q)
  assert float(keypoints.heatmap_kl(jnp.asarray(perfect), jnp.asarray(target),
                                    jnp.asarray(mask), temperature, sigma)) == pytest.approx(
                                        0.0, abs=1e-5)


def test_evaluate_reports_model_and_mean_keypoint_metrics(setup):
  _, experiment, _, _, state, _ = setup
  variables = state['variables']
  result = experiment.evaluate(variables)
  # Per task, its first validation image with the predicted keypoints.
  assert sorted(result.figures) == sorted(f'keypoints/{name}' for name in EVAL_TASKS)
  pred, target, base = {}, {}, {}
  for name in EVAL_TASKS:
    train = [r for r in experiment.train_records if r.task == name]
    mean = np.mean([preprocess.to_normalised(r.keypoints, r.image_hw) for r in train], axis=0)
    records = [r for r in experiment.val_records if r.task == name]
    # One image at a time through the prediction path (not the batched evaluation loop).
    pred[name] = np.stack([experiment.predict_image(variables, fmuia.read_image(r),
                                                    name)['keypoints_px'] for r in records])
    target[name] = np.stack([r.keypoints for r in records])
    base[name] = np.stack([mean * [r.image_hw[1], r.image_hw[0]] for r in records])
  want = metrics.evaluate(pred, target)
  for key in ('mre/weighted', 'mre/unweighted', 'mre/HC', 'sdr@10px/all',
              'biometry/fetal_femur/FL_mae'):
    assert result.metrics[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key
  for name in EVAL_TASKS:
    mre = np.mean(np.linalg.norm(base[name] - target[name], axis=-1))
    assert result.metrics[f'baseline/mean_keypoints/mre/{name}'] == pytest.approx(mre, rel=1e-6)
  assert result.metrics['baseline/mean_keypoints/mre/unweighted'] == pytest.approx(
      np.mean([result.metrics[f'baseline/mean_keypoints/mre/{n}'] for n in EVAL_TASKS]))


def test_predict_image_measures_the_predicted_keypoints(setup):
  _, experiment, _, _, state, _ = setup
  image = synthetic.generate('fetal_femur', 3)['image']
  out = experiment.predict_image(state['variables'], image, 'fetal_femur')
  h, w = image.shape
  assert out['keypoints_px'].shape == (2, 2)
  np.testing.assert_allclose(out['keypoints_px'], out['keypoints'] * [w, h])
  assert out['measurements']['FL'] == pytest.approx(
      float(np.linalg.norm(out['keypoints_px'][0] - out['keypoints_px'][1])))
  with pytest.raises(ValueError, match='Unknown SONICHU task'):
    experiment.predict_image(state['variables'], image, 'femur')


@pytest.mark.slow  # Two more compilations of the model.
def test_flip_tta_matches_the_model(setup):
  _, experiment, _, _, state, _ = setup
  image, _ = preprocess.preprocess(synthetic.generate('HC', 5)['image'])
  got = experiment._predict_padded(state['variables'], image[None], tasks.TASK_NAMES.index('HC'),
                                   tta=True)[:, :4]
  want = experiment.model.apply(state['variables'], jnp.asarray(image[None]), 'HC', tta=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # TTA must differ from the plain prediction (else the test proves nothing).
  plain = experiment.model.apply(state['variables'], jnp.asarray(image[None]), 'HC')
  assert not np.allclose(np.asarray(plain), np.asarray(want), atol=1e-6)


def test_bad_loss_name_is_refused(setup):
  config = setup[0].copy_and_resolve_references()
  config.loss = 'l2'
  with pytest.raises(ValueError, match="config.loss: unknown loss 'l2'"):
    keypoints.Experiment(config, load_data=False)

