"""Tests of the frozen-feature probe (sonichu_jax/probe.py).

The leave-one-out residuals must equal refitting without each image; the probe must read an
encoder from a run (and refuse another architecture, naming the flag), and score a known-linear
target perfectly where the features determine it.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import checkpointing
from launch import config_utils
from sonichu_jax import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_leave_one_out_equals_refitting():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(9, 20)), rng.normal(size=(9, 2))
  penalties = (0.1, 3.0)
  loo = probe.ridge_loo(x, y, penalties)
  for p, lam in enumerate(penalties):
    for i in range(len(x)):
      keep = np.arange(len(x)) != i
      refit = probe.ridge_predict(x[keep], y[keep], x[i:i + 1], lam)[0]
      np.testing.assert_allclose(loo[p, i], y[i] - refit, rtol=1e-9, atol=1e-12)


def test_probe_task_recovers_a_linear_map_and_skips_hidden_points():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 6))
  w = rng.normal(size=(6, 4))
  y = (x @ w).reshape(40, 2, 2)
  visible = np.ones((40, 2), bool)
  visible[:5, 1] = False  # Hidden points are left out of the fit, not fitted as (0, 0).
  y[:5, 1] = 0.0
  x_val = rng.normal(size=(7, 6))
  pred, penalty = probe.probe_task(x[:30], y[:30], visible[:30], x_val)
  assert penalty == min(probe.RELATIVE_PENALTIES)
  np.testing.assert_allclose(pred, (x_val @ w).reshape(7, 2, 2), atol=1e-3)


def _tiny_config(cache_dir):
  config = config_utils.load_config_file(
      os.path.join(ROOT, 'configs', 'sonichu', 'keypoints.py:sim'))
  config.data.synthetic.cache_dir = str(cache_dir)
  config.data.synthetic.num_train = 4
  config.data.synthetic.num_val = 2
  config.data.tasks = ('HC', 'fetal_femur')
  config.model.embed_dim = 16
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.head_filters = 8
  return config


def test_probe_of_a_run_and_of_a_random_encoder(tmp_path):
  config = _tiny_config(tmp_path / 'cache')
  random = probe.probe_variables(config, random_seed=3)
  result = probe.run_probe(config, random, batch_size=4)
  assert result['images'] == {'train': 8, 'val': 4}
  assert result['feature_dims'] == 8 * 8 * 16
  assert set(result['relative_penalty']) == {'HC', 'fetal_femur'}
  assert np.isfinite(result['metrics']['mre/weighted'])

  # An encoder read from a run replaces the random one.
  backbone = jax.tree.map(lambda v: np.asarray(v) + 1.0, random['params']['backbone'])
  run = str(tmp_path / 'run')
  checkpointing.save_variables(os.path.join(run, checkpointing.BEST_DIR), 5,
                               {'params': {'backbone': backbone}},
                               {'experiment': 'sonichu_jax.experiments.keypoints'})
  read = probe.probe_variables(config, encoder=run, checkpoint='best', random_seed=3)
  jax.tree.map(np.testing.assert_array_equal, read['params']['backbone'], backbone)

  config.model.embed_dim = 32
  with pytest.raises(ValueError, match=r"--encoder='.*run'.*another architecture"):
    probe.probe_variables(config, encoder=run, checkpoint='best')


def test_cli_needs_one_encoder_source(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'sonichu_jax.probe',
       f'--config={ROOT}/configs/sonichu/keypoints.py:sim', f'--out={tmp_path}/p.json'],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert done.returncode != 0
  assert 'one of --encoder or --random_seed' in done.stderr
  assert not os.path.exists(tmp_path / 'p.json')
