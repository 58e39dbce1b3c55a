"""In-process tests of the runtime pieces: sharded step, FSDP rule, checkpoints, config helpers."""
import functools
import os

import jax
import ml_collections
import numpy as np
import pytest

from launch import checkpointing
from launch import config_utils
from launch import experiment as experiment_lib
from launch import optim
from launch import sharding
from launch import trainer
import toy_experiment


@pytest.fixture(scope='module')
def toy_config(tmp_path_factory):
  config = toy_experiment.get_config()
  config.data_file = toy_experiment.write_teacher(str(tmp_path_factory.mktemp('toy') / 't.npz'))
  config.frozen = ('Dense_0/bias',)
  return config


def _one_step(config, devices, *, fsdp):
  """Init + one train step on a mesh over `devices`; returns host state, metrics, shardings."""
  mesh = sharding.make_mesh(devices)
  with jax.set_mesh(mesh):
    experiment = experiment_lib.load_experiment(config)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=24, warmup_steps=4,
                                        frozen=config.frozen)
    batch_sharding = sharding.batch_sharding(mesh)
    local = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
    batch = sharding.global_batch(local, batch_sharding)
    init_fn = functools.partial(trainer.init_state, experiment, tx)
    rng = jax.random.key(0)
    state_sharding = sharding.state_shardings(
        mesh, jax.eval_shape(init_fn, rng, batch), fsdp=fsdp, fsdp_min_size_mb=0)
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng, batch)
    init_bias = np.asarray(state['variables']['params']['Dense_0']['bias'])
    step = jax.jit(trainer.make_train_step(experiment, tx, schedule, config.frozen),
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    state, metrics = step(state, batch)
    kernel_sharding = state['variables']['params']['Conv_0']['kernel'].sharding
    return (jax.device_get(state['variables']), jax.device_get(metrics), init_bias,
            batch['image'].sharding, kernel_sharding)


@pytest.fixture(scope='module')
def single_device_step(toy_config):
  return _one_step(toy_config, jax.devices()[:1], fsdp=False)


@pytest.mark.parametrize('fsdp', [False, True])
def test_sharded_step_equals_single_device(toy_config, single_device_step, fsdp):
  assert jax.device_count() == 8
  ref_vars, ref_metrics, _, _, _ = single_device_step
  variables, metrics, init_bias, batch_sh, kernel_sh = _one_step(toy_config, jax.devices(),
                                                                 fsdp=fsdp)
  # The batch really is split over the 8 devices, and FSDP splits the conv kernel's 8 outputs.
  assert batch_sh.spec == jax.sharding.PartitionSpec('data')
  assert kernel_sh.spec == (jax.sharding.PartitionSpec(None, None, None, 'data') if fsdp
                            else jax.sharding.PartitionSpec())
  # Same numbers up to float32 reduction order (BatchNorm statistics are global-batch means under
  # jit, all-reduced over the devices): rtol 1e-5.
  for path, want in jax.tree_util.tree_flatten_with_path(ref_vars)[0]:
    got = functools.reduce(lambda t, k: t[k.key], path, variables)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(path))
  assert set(variables) == {'params', 'batch_stats'}
  # BatchNorm statistics moved away from their init (mean 0, var 1).
  assert np.abs(variables['batch_stats']['BatchNorm_0']['mean']).max() > 1e-3
  for key in ('loss', 'grad_norm', 'lr'):
    assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5)
  # The frozen bias did not move.
  np.testing.assert_array_equal(variables['params']['Dense_0']['bias'], init_bias)


def test_fsdp_spec_shards_largest_divisible_axis():
  p = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((3, 16, 24), 8) == p(None, None, 'data')
  assert sharding.fsdp_spec((12, 16), 8) == p(None, 'data')
  assert sharding.fsdp_spec((3, 5), 8) == p()
  mesh = sharding.make_mesh()
  abstract = {'big': jax.ShapeDtypeStruct((64, 1024), np.float32),  # 256 KiB
              'small': jax.ShapeDtypeStruct((64, 8), np.float32),
              'key': jax.ShapeDtypeStruct((), jax.random.key(0).dtype)}
  got = sharding.state_shardings(mesh, abstract, fsdp=True, fsdp_min_size_mb=0.25)
  assert got['big'].spec == p(None, 'data')
  assert got['small'].spec == p() and got['key'].spec == p()


def test_best_checkpoint_only_on_improvement(tmp_path):
  workdir = str(tmp_path / 'run')
  variables = {'params': {'w': np.arange(4, dtype=np.float32)}}
  ckpts = checkpointing.RunCheckpoints(workdir, keep=2, best_metric='err', best_mode='min')
  assert ckpts.maybe_save_best(10, variables, {'err': 2.0}, {'seed': 0})
  assert not ckpts.maybe_save_best(20, variables, {'err': 3.0}, {'seed': 0})
  assert not ckpts.maybe_save_best(25, variables, {'err': float('nan')}, {'seed': 0})
  variables2 = {'params': {'w': np.full(4, 7, np.float32)}}
  assert ckpts.maybe_save_best(30, variables2, {'err': 1.5}, {'seed': 0})
  with pytest.raises(KeyError, match="config.best_metric 'err' is not among"):
    ckpts.maybe_save_best(40, variables, {'mse': 1.0}, {'seed': 0})
  ckpts.wait_until_finished()
  ckpts.close()
  assert sorted(os.listdir(os.path.join(workdir, 'best'))) == ['30']
  # A new instance (a resumed run) knows the best value so far.
  again = checkpointing.RunCheckpoints(workdir, keep=2, best_metric='err', best_mode='min')
  assert again.best_value() == 1.5 and again.best_step() == 30
  again.close()
  directory, step = checkpointing.find_checkpoint(workdir, 'best')
  assert step == 30
  mesh = sharding.make_mesh()
  restored, config = checkpointing.restore_variables(directory, step, sharding.replicated(mesh))
  np.testing.assert_array_equal(restored['params']['w'], variables2['params']['w'])
  assert config == {'seed': 0}
  assert checkpointing.find_checkpoint(None, os.path.join(workdir, 'best', '30')) == (
      os.path.join(workdir, 'best'), 30)
  with pytest.raises(FileNotFoundError, match='no checkpoint found'):
    checkpointing.find_checkpoint(workdir, 'latest')
  with pytest.raises(ValueError, match="best_mode must be 'min' or 'max'"):
    checkpointing.is_better(1.0, 2.0, 'lowest')
  assert checkpointing.is_better(3.0, 2.0, 'max') and not checkpointing.is_better(1.0, 2.0, 'max')


def test_unknown_override_is_named_with_close_matches():
  config = toy_experiment.get_config()
  message = config_utils.unknown_override_message(
      config, ['train', '--config=x.py', '--config.optim.lrr=0.1'])
  assert message.startswith("unknown config key 'optim.lrr' in --config.optim.lrr=0.1: "
                            "config.optim has no field 'lrr'.")
  assert 'Did you mean: optim.lr?' in message
  assert 'Keys of config.optim: b1, b2, eps, grad_clip_norm, lr, schedule, weight_decay.' in message
  message = config_utils.unknown_override_message(config, ['--config.batchsize=4'])
  assert "unknown config key 'batchsize'" in message and 'batch_size' in message
  message = config_utils.unknown_override_message(config, ['--config.lr=0.1'])
  assert 'Did you mean: optim.lr?' in message
  assert config_utils.unknown_override_message(config, ['--config.optim.lr=0.1']) is None


def test_config_diff_and_json_round_trip():
  config = ml_collections.ConfigDict({'a': 1, 'b': {'c': (1, 2), 'd': None}})
  saved = config_utils.to_json_dict(config)
  assert saved == {'a': 1, 'b': {'c': [1, 2], 'd': None}}
  assert config_utils.from_json_dict(saved).b.c == [1, 2]
  changed = config_utils.to_json_dict(ml_collections.ConfigDict({'a': 2, 'b': {'c': (1, 2)}}))
  assert config_utils.diff(saved, changed) == ['a: 1 -> 2', 'b.d: None -> (removed)']
  with pytest.raises(config_utils.ConfigError, match='config.b.e is required'):
    config_utils.require(config, 'b.e')


def test_eval_result_is_checked():
  picture = np.zeros((2, 3, 3), np.uint8)
  good = toy_experiment.ToyEvalResult(metrics={'m': np.float32(1.5)}, figures={'a/b': picture})
  result = experiment_lib.check_eval_result(good)
  assert result.metrics == {'m': 1.5} and isinstance(result.metrics['m'], float)
  assert result.figures == {'a/b': picture}
  bad = toy_experiment.ToyEvalResult(metrics={}, figures={'a': picture[..., :1]})
  with pytest.raises(ValueError, match=r"figures\['a'\] is an array of shape \(2, 3, 1\)"):
    experiment_lib.check_eval_result(bad)
  with pytest.raises(TypeError, match='with .metrics'):
    experiment_lib.check_eval_result({'metrics': {}})


def test_missing_experiment_module_is_a_config_error():
  config = ml_collections.ConfigDict({'experiment': 'no_such_module.experiments'})
  with pytest.raises(config_utils.ConfigError, match="cannot import module 'no_such_module"):
    experiment_lib.load_experiment(config)
