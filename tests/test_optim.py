"""Tests of launch/optim.py: the original schedule, torch-equivalent AdamW, frozen subtrees."""
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch import optim

# The lr that the original DualTrack code (src/optimizer/optimizer.py, warmup_cosine, stepped after
# every optimizer.step()) uses at each step, recorded by running that code under torch 2.13 with
# CosineAnnealingLR.get_lr's torch-2.7.1 `last_epoch == 0` check restored (torch 2.7.1 is pinned
# by the original's requirements.txt). Key: (lr, epochs, steps per epoch, warmup epochs).
TORCH_WARMUP_COSINE = {
    (1e-3, 4, 3, 1): [
        0.00033333399999999996, 0.000666667, 0.001, 0.000966216088617589,
        0.0008856007589415737, 0.0007808611706096958, 0.0006590097423302681,
        0.0005282084627709407, 0.00039719767662021587, 0.0002746746039513697,
        0.00016864977327606885, 8.578643762690496e-05],
    (1e-4, 5, 2, 0): [
        9.516553824444453e-05, 8.386590697412433e-05, 6.968044012954537e-05,
        5.395961100811342e-05, 3.819660112501052e-05, 2.387287570313158e-05,
        1.229559893979391e-05, 4.424211972088169e-06, 6.271407734229158e-07, 0.0],
    (0.5, 3, 4, 1): [
        0.1251875, 0.250125, 0.37506249999999997, 0.5, 0.48310804430879445,
        0.4428003794707868, 0.3904305853048479, 0.32950487116513405, 0.26410423138547034,
        0.19859883831010794, 0.13733730197568483, 0.08432488663803443],
}
# torch CosineAnnealingLR(T_max=12), lr 1e-3, stepped per iteration (same recording).
TORCH_COSINE = [
    0.001, 0.0009829629131445341, 0.0009330127018922195, 0.0008535533905932737, 0.00075,
    0.0006294095225512604, 0.0005, 0.0003705904774487397, 0.0002500000000000001,
    0.00014644660940672628, 6.698729810778065e-05, 1.70370868554659e-05]


def _values(schedule, n):
  return np.asarray(jax.vmap(schedule)(jnp.arange(n)), np.float64)


@pytest.mark.parametrize('key', list(TORCH_WARMUP_COSINE))
def test_warmup_cosine_matches_original(key):
  lr, epochs, steps_per_epoch, warmup_epochs = key
  got = _values(optim.warmup_cosine_schedule(lr, epochs * steps_per_epoch,
                                             warmup_epochs * steps_per_epoch),
                epochs * steps_per_epoch)
  np.testing.assert_allclose(got, TORCH_WARMUP_COSINE[key], rtol=2e-6, atol=1e-12)


def test_warmup_cosine_hand_values():
  # lr 0.5, T = 12 steps, W = 4 warmup steps, initial factor f = 0.5 / 1000.
  base, f, t_max = 0.5, 0.5e-3, 12
  got = _values(optim.warmup_cosine_schedule(base, t_max, 4), t_max)
  assert got[0] == pytest.approx(base * (f + (1 - f) * 1 / 4), rel=1e-6)  # c = 1, not 0
  assert got[2] == pytest.approx(base * (f + (1 - f) * 3 / 4), rel=1e-6)
  assert got[3] == pytest.approx(base, rel=1e-6)  # e = 0
  # e = 1: closed form at 1 times the chainable ratio (1+cos(pi/12)) / (1+cos(0)).
  closed = base * (1 + math.cos(math.pi / t_max)) / 2
  assert got[4] == pytest.approx(closed * (1 + math.cos(math.pi / t_max)) / 2, rel=1e-6)
  e = 8  # last step: c = 12
  ratio = (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
  assert got[11] == pytest.approx(base * (1 + math.cos(math.pi * e / t_max)) / 2 * ratio,
                                  rel=1e-5)


def test_warmup_cosine_stays_finite_on_long_runs():
  # 1 + cos(pi e / T) underflows in float32 near the end; the schedule must not give 0/0.
  got = _values(optim.warmup_cosine_schedule(1e-4, 250_000, 0), 250_000)[-20:]
  assert np.all(np.isfinite(got)) and np.all(got >= 0) and got[-1] == 0
  assert np.all(np.diff(got) <= 0)


def test_cosine_and_constant_schedules():
  cosine = optim.make_schedule({'lr': 1e-3, 'schedule': 'cosine'}, total_steps=12,
                               warmup_steps=0)
  np.testing.assert_allclose(_values(cosine, 12), TORCH_COSINE, rtol=2e-6, atol=1e-12)
  constant = optim.make_schedule({'lr': 2e-3, 'schedule': 'constant'}, total_steps=12,
                                 warmup_steps=0)
  np.testing.assert_allclose(_values(constant, 3), [2e-3] * 3, rtol=1e-7)


def test_schedule_errors_name_the_key():
  with pytest.raises(ValueError, match="config.optim.schedule: unknown schedule 'linear'"):
    optim.make_schedule({'lr': 1.0, 'schedule': 'linear'}, total_steps=10, warmup_steps=0)
  with pytest.raises(ValueError, match='warmup'):
    optim.make_schedule({'lr': 1.0, 'schedule': 'cosine'}, total_steps=10, warmup_steps=2)
  with pytest.raises(ValueError, match='config.optim.lr'):
    optim.make_optimizer({}, total_steps=10, warmup_steps=0)


def _numpy_torch_adamw(p, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW's documented algorithm (checked against torch 2.13 to 1e-16)."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return p


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_adamw_matches_torch_with_scheduled_decay():
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal(6).astype(np.float32)
  grads = [rng.standard_normal(6).astype(np.float32) for _ in range(4)]
  config = {'lr': 0.1, 'weight_decay': 0.3, 'schedule': 'warmup_cosine'}
  tx, schedule = optim.make_optimizer(config, total_steps=4, warmup_steps=2)
  got = _run(tx, {'w': jnp.asarray(p0)}, [{'w': jnp.asarray(g)} for g in grads])['w']
  lrs = _values(schedule, 4)
  want = _numpy_torch_adamw(p0.astype(np.float64), [g.astype(np.float64) for g in grads], lrs,
                            0.3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_frozen_subtree_is_unchanged_and_not_decayed():
  params = {'encoder': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))},
            'head': {'kernel': jnp.ones((2, 1))}}
  grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
  tx, _ = optim.make_optimizer({'lr': 0.1, 'weight_decay': 0.5, 'schedule': 'constant'},
                               total_steps=10, warmup_steps=0, frozen=('encoder/.*',))
  state = tx.init(params)
  out = _run(tx, params, [grads, grads])
  np.testing.assert_array_equal(out['encoder']['kernel'], params['encoder']['kernel'])
  np.testing.assert_array_equal(out['encoder']['bias'], params['encoder']['bias'])
  # The head gets two AdamW steps: decay then a unit-size Adam step, each at lr 0.1.
  want = _numpy_torch_adamw(np.ones(1), [np.full(1, 0.5)] * 2, [0.1, 0.1], 0.5)
  np.testing.assert_allclose(np.asarray(out['head']['kernel']).ravel(), [want[0]] * 2, rtol=1e-5)
  # No Adam moments are kept for frozen leaves.
  mu = state.inner_states[optim.TRAINABLE].inner_state[0].mu
  assert isinstance(mu['encoder']['kernel'], optax.MaskedNode)
  assert mu['head']['kernel'].shape == (2, 1)


def test_frozen_pattern_must_match_a_parameter():
  params = {'encoder': {'kernel': jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"config.frozen: pattern 'encodr/\.\*' matches no "
                                       r'parameter; parameter paths are: encoder/kernel'):
    optim.trainable_mask(params, ('encodr/.*',))
  # fullmatch: a prefix alone does not match.
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.trainable_mask(params, ('encoder',))


def test_gradient_clipping_uses_trainable_norm_only():
  params = {'a': jnp.zeros((2,)), 'frozen': jnp.zeros((2,))}
  grads = [{'a': jnp.array([3.0, 4.0]), 'frozen': jnp.array([100.0, 0.0])},
           {'a': jnp.array([0.3, -0.1]), 'frozen': jnp.array([100.0, 0.0])}]
  mask = optim.trainable_mask(params, ('frozen',))
  assert float(optim.masked_global_norm(grads[0], mask)) == pytest.approx(5.0)
  tx, _ = optim.make_optimizer({'lr': 1.0, 'grad_clip_norm': 1.0, 'schedule': 'constant'},
                               total_steps=2, warmup_steps=0, frozen=('frozen',))
  out = _run(tx, params, grads)
  # Norms over the trainable leaf only: 5 -> scaled to [0.6, 0.8]; 0.32 < 1 -> unchanged. Adam is
  # scale-invariant per step but not across steps, so a norm that included the frozen gradient
  # (about 100 at both steps) would give a different result.
  want = _numpy_torch_adamw(np.zeros(2), [np.array([0.6, 0.8]), np.array([0.3, -0.1])],
                            [1.0, 1.0], 0.0)
  np.testing.assert_allclose(out['a'], want, rtol=1e-5)
  np.testing.assert_array_equal(out['frozen'], [0.0, 0.0])


def test_ijepa_schedules_hand_values():
  config = {'lr': 1e-3, 'schedule': 'ijepa_warmup_cosine', 'start_lr': 2e-4, 'final_lr': 1e-6,
            'weight_decay': 0.04, 'final_weight_decay': 0.4}
  lr = optim.make_schedule(config, total_steps=10, warmup_steps=3)
  # Update k uses s = k + 1: warm-up while s < 3, then a cosine from lr to final_lr at s = 10.
  np.testing.assert_allclose([float(lr(k)) for k in (0, 1, 2, 9)],
                             [2e-4 + 8e-4 / 3, 2e-4 + 16e-4 / 3, 1e-3, 1e-6], rtol=1e-5)
  wd = optim.cosine_weight_decay_schedule(0.04, 0.4, 10)
  np.testing.assert_allclose([float(wd(k)) for k in (4, 9)], [0.22, 0.4], rtol=1e-5)
  # A parameter without gradient moves by -lr_k wd_k p: the scheduled decay reaches AdamW.
  tx, _ = optim.make_optimizer(config, total_steps=10, warmup_steps=3)
  params = {'w': jnp.ones(2)}
  updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -float(lr(0)) * float(wd(0)), rtol=1e-5)
  with pytest.raises(ValueError, match='needs config.optim.start_lr and final_lr'):
    optim.make_schedule({'lr': 1e-3, 'schedule': 'ijepa_warmup_cosine'}, total_steps=10,
                        warmup_steps=3)


LAYER_DECAY_GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'optim',
                                  'layer_decay.npz')
# The toy ViT of scripts/record_layer_decay_golden.py: depth 2, ViTPose's rules in our paths.
LAYER_DECAY = {'layer_decay': 0.75, 'num_layers': 2 + 2,
               'layer_ids': ((r'backbone/(?:patch_embed/.*|pos_embed)', 0),
                             (r'backbone/blocks_(\d+)/.*', 1))}


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(value)
  return tree


def test_layer_decay_matches_vitpose_groups_and_torch_adamw():
  golden = dict(np.load(LAYER_DECAY_GOLDEN))
  part = lambda prefix: {k.removeprefix(prefix): v for k, v in golden.items()
                         if k.startswith(prefix)}
  init = part('init/')
  params = _unflatten(init)
  # The original constructor's groups: our scales, and its no-decay rule as config.optim.no_decay.
  scales = optim.layer_scales(params, 0.75, 4, LAYER_DECAY['layer_ids'])
  flat_scales = {optim.param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}
  for path, scale in part('lr_scale/').items():
    assert flat_scales[path] == pytest.approx(float(scale), rel=1e-15), path
  config = {'lr': 0.05, 'weight_decay': 0.1, 'schedule': 'linear_warmup_cosine',
            'grad_clip_norm': 1.0, 'no_decay': ('.*/bias', '.*/scale', 'backbone/pos_embed'),
            'sparse_groups': (r'heads_(\w+)/.*',), **LAYER_DECAY}
  tx, schedule = optim.make_optimizer(config, total_steps=4, warmup_steps=2,
                                      frozen=('backbone/patch_embed/proj/bias',))
  np.testing.assert_allclose([float(schedule(0)), float(schedule(1))], [0.025, 0.05], rtol=1e-7)
  for path, wd in part('weight_decay/').items():
    decayed = not any(re.fullmatch(p, path) for p in config['no_decay'])
    assert wd == (0.1 if decayed else 0.0), path
  state = tx.init(params)
  update = jax.jit(tx.update)  # One compilation: faster than many small eager ops.
  for step in (0, 1):
    grads = {path: golden.get(f'grad{step}/{path}', np.zeros_like(value))
             for path, value in init.items()}
    # The frozen leaf gets a large gradient: it must neither move nor enter the clipped norm.
    grads['backbone/patch_embed/proj/bias'] = np.full(4, 100.0, np.float32)
    updates, state = update(_unflatten(grads), state, params)
    params = optax.apply_updates(params, updates)
    for path, want in part(f'step{step + 1}/').items():
      got = params
      for key in path.split('/'):
        got = got[key]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f'{path} step {step}')


def test_layer_decay_errors_name_the_key():
  params = {'backbone': {'blocks_0': {'kernel': jnp.ones(2)}, 'pos_embed': jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"config.optim.layer_ids: pattern 'blocks_.*' matches no "
                                       'parameter'):
    optim.layer_scales(params, 0.75, 3, (('blocks_.*', 1),))
  with pytest.raises(ValueError, match=r'config.optim.layer_ids: backbone/blocks_0/kernel gets '
                                       r'layer id 3, outside \[0, config.optim.num_layers = 3\)'):
    optim.layer_scales(params, 0.75, 3, ((r'backbone/blocks_(\d+)/.*', 3),))
  with pytest.raises(ValueError, match='config.optim.layer_ids: each rule is a'):
    optim.layer_scales(params, 0.75, 3, ('backbone/.*',))
  with pytest.raises(ValueError, match=r'config.optim.layer_decay must be in \(0, 1\]'):
    optim.make_optimizer({'lr': 1.0, 'layer_decay': 1.5, 'num_layers': 3, 'schedule': 'constant'},
                         total_steps=2, warmup_steps=0)[0].init(params)


def test_sonichu_config_gives_vitpose_b_scales():
  # The rules of configs/sonichu/keypoints.py on SONICHU's ViT-B/16 parameter tree (shapes only).
  from launch import config_utils  # pylint: disable=g-import-not-at-top
  from sonichu_jax.experiments import keypoints  # pylint: disable=g-import-not-at-top
  from sonichu_jax.models import sonichu  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config_file(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'sonichu',
      'keypoints.py'))
  o = config.optim
  assert (o.layer_decay, o.num_layers) == (0.75, 14)
  params = sonichu.abstract_variables(keypoints.build_model(config))['params']
  scales = {optim.param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      optim.layer_scales(params, o.layer_decay, o.num_layers, o.layer_ids))[0]}
  # training_and_export_notes.md section 2.2: embed 0.0238, block 0 0.0317, block 11 0.75.
  assert scales['backbone/patch_embed/proj/kernel'] == pytest.approx(0.75**13)
  assert scales['backbone/pos_embed'] == pytest.approx(0.0238, abs=1e-4)
  assert scales['backbone/blocks_0/attn/qkv/kernel'] == pytest.approx(0.0317, abs=1e-4)
  assert scales['backbone/blocks_11/mlp/fc2/bias'] == 0.75
  assert scales['backbone/norm/scale'] == 1.0
  assert {s for p, s in scales.items() if p.startswith('heads_')} == {1.0}
  # ViTPose's no-decay rule (1-D, biases, pos_embed) is what config.optim.no_decay and frozen give.
  decayed = jax.tree.leaves(optim.path_mask(params, o.no_decay + config.frozen, 'no_decay'))
  for (path, leaf), skip in zip(jax.tree_util.tree_flatten_with_path(params)[0], decayed):
    name = optim.param_path(path)
    assert skip == (leaf.ndim == 1 or name.endswith('bias') or 'pos_embed' in name), name
