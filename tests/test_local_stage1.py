"""DualTrack local stage 1 through the runtime: configs, data, train, resume, evaluate."""
import json
import os

import jax
import numpy as np
import pytest

from dualtrack_jax.data import registry
from dualtrack_jax.experiments import common
from dualtrack_jax.experiments import local_stage1
from launch import config_utils
from launch import evaluate
from launch import trainer

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'dualtrack', 'local_stage1.py')


def _tiny_config(cache_dir, **overrides):
  """The sim variant shrunk to seconds: 2 training sweeps of 40 frames, a 4-8 channel CNN."""
  config = config_utils.load_config_file(f'{CONFIG}:sim')
  config.data.synthetic.update(num_train=2, num_val=1, cache_dir=str(cache_dir))
  config.data.synthetic.simulator = dict(num_frames=(40, 40), height=48, width=64)
  config.data.window = 8
  config.data.crop = (32, 32)
  config.model.widths = (4, 4, 8, 8)
  config.model.stem_width = 4
  config.batch_size = 8  # One window per device of the 8 simulated ones.
  config.total_steps = 2
  config.eval_tile = 4
  config.update(overrides)
  return config


def test_full_config_keeps_the_original_recipe():
  config = config_utils.load_config_file(CONFIG)
  assert (config.optim.lr, config.optim.weight_decay, config.num_epochs) == (1e-4, 1e-3, 5000)
  assert (config.batch_size, config.data.window, tuple(config.data.crop)) == (1, 16, (256, 256))
  assert (config.warmup_epochs, config.eval_every_epochs) == (0, 100)
  assert tuple(config.model.widths) == (64, 128, 256, 512) and config.model.stem_width == 45
  assert tuple(config.model.temporal_kernels) == (3, 3, 3, 3)
  assert dict(config.data.augment) == dict(flip_p=0.5, reverse_p=0.5, random_crop=True)


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match='unknown variant'):
    config_utils.load_config_file(f'{CONFIG}:huge')


def test_missing_dataset_names_it_and_the_registry(tmp_path):
  reg = tmp_path / 'datasets.json'
  reg.write_text(json.dumps({'other': {'csv': 'other.csv'}}))
  config = config_utils.load_config_file(CONFIG)
  config.data.dataset = 'tus-rec-2099'
  config.data.registry = str(reg)
  with pytest.raises(registry.DatasetError, match=r'tus-rec-2099') as e:
    local_stage1.Experiment(config)
  assert str(reg) in str(e.value)


@pytest.mark.slow
def test_train_resume_and_evaluate_on_simulated_sweeps(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _tiny_config(tmp_path / 'cache')
  trainer.train_and_evaluate(config, workdir)
  # Resuming a finished run does nothing; a longer run continues from step 2.
  config.total_steps = 3
  final = trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']
  gpe = common.GPE
  for key in (gpe, f'baseline/zero_motion/{gpe}', f'baseline/mean_motion/{gpe}', 'mae/z',
              'drift/hausdorff'):
    assert np.isfinite(final[key]), key

  summary = evaluate.evaluate_checkpoint(workdir, 'latest')
  assert summary['step'] == 3
  assert summary['metrics'] == pytest.approx(final)
  out = os.path.join(workdir, 'eval', 'checkpoints_3')
  assert sorted(os.listdir(out)) == ['metrics.json', 'trajectory_val_0000.png']


@pytest.mark.slow
def test_evaluation_composes_whole_sweep_predictions(tmp_path):
  """The reported trajectory is the composition of one untiled pass over the sweep."""
  config = _tiny_config(tmp_path / 'cache')
  experiment = local_stage1.Experiment(config)
  batch = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
  variables = experiment.init(jax.random.key(0), batch)
  result = experiment.evaluate(variables)
  (sweep,) = result.sweeps
  assert list(result.figures) == [f'trajectory/{sweep["sweep_id"]}']
  val = next(iter(local_stage1.pipeline.whole_sweeps(
      experiment.val_records, crop_hw=(32, 32), seed=0, augment=None, shuffle=False,
      num_epochs=1)))
  whole = experiment.model.apply(variables, val['images'].astype(np.float32) / 255.0)
  np.testing.assert_allclose(sweep['pred_global'], common.trajectory(whole[0]),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sweep['gt_global'][0], np.eye(4), atol=1e-12)
