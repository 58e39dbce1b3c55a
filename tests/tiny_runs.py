"""Tiny runs for the tests of prediction, export and submission: random variables saved as a
run's best checkpoint, with no training (jax.random init and training compile slowly on CPU)."""
import os

import jax
import ml_collections
import numpy as np

from dualtrack_jax.experiments import local_stage1
from launch import checkpointing
from launch import config_utils
from sonichu_jax.experiments import keypoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_variables(shapes, seed: int):
  """Uniform(-0.2, 0.2) variables of the given shapes; batch-norm variances are ones."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if jax.tree_util.keystr(path).endswith("['var']")
                       else rng.uniform(-0.2, 0.2, s.shape).astype(s.dtype)), shapes)


def save_run(workdir: str, config: ml_collections.ConfigDict, variables) -> str:
  """`variables` as the best checkpoint (step 7) of a run folder `workdir`; returns it."""
  checkpoints = checkpointing.RunCheckpoints(workdir, best_metric='loss')
  checkpoints.maybe_save_best(7, variables, {'loss': 1.0}, config_utils.to_json_dict(config))
  checkpoints.wait_until_finished()
  checkpoints.close()
  return workdir


def stage1_run(workdir: str, cache_dir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config, run folder) of a tiny stage-1 local encoder (32x32 crops, widths 4-8).

  Its dataset is never read (prediction builds the model only): `cache_dir` must stay empty.
  """
  config = config_utils.load_config_file(
      os.path.join(ROOT, 'configs', 'dualtrack', 'local_stage1.py') + ':sim')
  config.data.synthetic.cache_dir = cache_dir
  config.data.crop = (32, 32)
  config.model.widths = (4, 4, 8, 8)
  config.model.stem_width = 4
  config.eval_tile = 4
  experiment = local_stage1.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'images': np.zeros((1, 2, 32, 32), np.uint8)})
  return config, save_run(workdir, config, random_variables(shapes, 0))


def sonichu_run(workdir: str, seed: int, cache_dir: str,
                **model) -> tuple[ml_collections.ConfigDict, str]:
  """(config, run folder) of a tiny SONICHU keypoint model (one-block ViT, tasks fetal_femur and
  HC, `model` overriding config.model keys) over a few synthetic images cached in `cache_dir`."""
  config = config_utils.load_config_file(
      os.path.join(ROOT, 'configs', 'sonichu', 'keypoints.py') + ':sim')
  config.data.tasks = ('fetal_femur', 'HC')
  config.data.synthetic.update(num_train=2, num_val=3, cache_dir=cache_dir)
  config.model.update({**dict(embed_dim=16, depth=1, num_heads=2, head_filters=8), **model})
  config.eval_batch_size = 2
  experiment = keypoints.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'image': np.zeros((1, 256, 256, 3), np.float32)})
  return config, save_run(workdir, config, random_variables(shapes, seed))
