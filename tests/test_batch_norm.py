"""Tests of ultrasound_common/batch_norm.py against numbers recorded with torch's BatchNorm2d/3d.

tests/fixtures/batch_norm_torch.npz comes from scripts/record_batch_norm_torch.py (torch 2.13.0,
CPU): two training steps and one evaluation step of `torch.nn.BatchNorm2d` and `BatchNorm3d`
(momentum 0.1, eps 1e-5, seeded weight and bias) on seeded inputs with 24 and 36 values per
channel, where the unbiased variance is 4% and 3% above the biased one.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrasound_common import batch_norm

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'batch_norm_torch.npz')


@pytest.fixture(scope='module')
def torch_numbers():
  with np.load(FIXTURE) as f:
    return {key: f[key] for key in f.files}


def _channels_last(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, 1, -1)


# torch's momentum=0.1 in Flax's convention, as the models use it.
LAYER = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5)


@jax.jit
def _train_step(variables, x):
  return LAYER.apply(variables, x, use_running_average=False, mutable=['batch_stats'])


@jax.jit
def _eval_step(variables, x):
  return LAYER.apply(variables, x, use_running_average=True, mutable=['batch_stats'])


@pytest.mark.parametrize('kind', ['2d', '3d'])
def test_two_training_steps_and_eval_match_torch(torch_numbers, kind):
  t = {key.split('/', 1)[1]: value for key, value in torch_numbers.items()
       if key.startswith(f'{kind}/')}
  channels = len(t['weight'])
  # torch's initial buffers: running mean 0, running var 1.
  variables = {'params': {'scale': t['weight'], 'bias': t['bias']},
               'batch_stats': {'mean': np.zeros(channels, np.float32),
                               'var': np.ones(channels, np.float32)}}
  for step in range(2):
    y, state = _train_step(variables, _channels_last(t[f'x{step}']))
    # Training normalises with the batch's biased variance, as torch does.
    np.testing.assert_allclose(y, _channels_last(t[f'y{step}']), rtol=1e-5, atol=1e-5)
    stats = state['batch_stats']
    np.testing.assert_allclose(stats['mean'], t[f'running_mean{step}'], rtol=1e-6, atol=1e-7)
    # ... and folds the unbiased variance into the running one.
    np.testing.assert_allclose(stats['var'], t[f'running_var{step}'], rtol=1e-6)
    variables = {'params': variables['params'], 'batch_stats': stats}
  y, state = _eval_step(variables, _channels_last(t['x_eval']))
  np.testing.assert_allclose(y, _channels_last(t['y_eval']), rtol=1e-5, atol=1e-5)
  # Evaluation reads the running statistics and leaves them as they are.
  for name in ('mean', 'var'):
    np.testing.assert_array_equal(state['batch_stats'][name], variables['batch_stats'][name])
  # The fixture tells the two updates apart: Flax's biased one misses torch's by n / (n - 1).
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  start = {'params': variables['params'],
           'batch_stats': {'mean': np.zeros(channels, np.float32),
                           'var': np.ones(channels, np.float32)}}
  _, biased = flax_bn.apply(start, _channels_last(t['x0']), use_running_average=False,
                            mutable=['batch_stats'])
  assert np.all(np.abs(biased['batch_stats']['var'] / t['running_var0'] - 1) > 1e-3)
  n = t['x0'].size // channels
  batch_var = (biased['batch_stats']['var'] - 0.9) / 0.1
  np.testing.assert_allclose(0.9 + 0.1 * batch_var * n / (n - 1), t['running_var0'], rtol=1e-5)


def test_variables_dtypes_and_outputs_are_those_of_flax_batch_norm():
  """Same variable names, shapes and dtypes as nn.BatchNorm, and its outputs bit for bit."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4), jnp.bfloat16) * 2 + 1
  ours = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16)
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16,
                         param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(ours.init, use_running_average=False),
                          jax.random.key(1), x)
  expected = jax.eval_shape(functools.partial(flax_bn.init, use_running_average=False),
                            jax.random.key(1), x)
  assert shapes == expected
  assert shapes['params']['scale'].dtype == jnp.bfloat16
  assert shapes['batch_stats']['var'] == jax.ShapeDtypeStruct((4,), jnp.float32)
  variables = {'params': {'scale': jnp.full(4, 1.5, jnp.bfloat16),
                          'bias': jnp.full(4, -0.25, jnp.bfloat16)},
               'batch_stats': {'mean': jnp.full(4, 0.5), 'var': jnp.full(4, 2.0)}}
  for train in (True, False):
    y, state = ours.apply(variables, x, use_running_average=not train, mutable=['batch_stats'])
    y_flax, state_flax = flax_bn.apply(variables, x, use_running_average=not train,
                                       mutable=['batch_stats'])
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_flax, np.float32))
    np.testing.assert_array_equal(state['batch_stats']['mean'], state_flax['batch_stats']['mean'])
  # Initialisation leaves the statistics at torch's initial values.
  init = ours.init(jax.random.key(1), x, use_running_average=False)
  np.testing.assert_array_equal(init['batch_stats']['mean'], 0)
  np.testing.assert_array_equal(init['batch_stats']['var'], 1)


def test_sharded_batch_counts_the_global_batch():
  """Under jit with the batch split over 8 devices: SyncBN, n = the global values per channel."""
  assert jax.device_count() == 8
  x = np.random.default_rng(0).normal(1.0, 2.0, (8, 3, 2, 5)).astype(np.float32)
  variables = {'params': {'scale': np.ones(5, np.float32), 'bias': np.zeros(5, np.float32)},
               'batch_stats': {'mean': np.zeros(5, np.float32), 'var': np.ones(5, np.float32)}}
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  y, state = _train_step(variables, sharded)
  assert len(y.sharding.device_set) == 8
  x64 = x.reshape(-1, 5).astype(np.float64)
  np.testing.assert_allclose(state['batch_stats']['var'], 0.9 + 0.1 * x64.var(0, ddof=1),
                             rtol=1e-6)
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * x64.mean(0), rtol=1e-6)
  _, single = _train_step(variables, x)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(state['batch_stats'][name], single['batch_stats'][name], rtol=1e-6)


def test_training_on_one_value_per_channel_is_refused():
  variables = {'params': {'scale': np.ones(2, np.float32), 'bias': np.zeros(2, np.float32)},
               'batch_stats': {'mean': np.zeros(2, np.float32), 'var': np.ones(2, np.float32)}}
  with pytest.raises(ValueError, match=r'more than 1 value per channel, got input shape '
                                       r'\(1, 1, 1, 2\)'):
    LAYER.apply(variables, np.ones((1, 1, 1, 2), np.float32), use_running_average=False,
                mutable=['batch_stats'])
