r"""SONICHU keypoint training (configs/sonichu/keypoints.py) from an I-JEPA pretraining run.

The recipe of keypoints.py (same `:sim` variant), plus `init_from.ijepa`: the backbone starts as
the pretraining run's encoder (the heads start afresh). The run must have the same backbone:
pretrain_ijepa.py pairs with keypoints.py, and pretrain_ijepa.py:sim with keypoints.py:sim.

  python -m launch.train --config=configs/sonichu/pretrain_ijepa.py:sim --workdir=workdirs/ijepa_sim
  python -m launch.train --config=configs/sonichu/keypoints_from_ijepa.py:sim \
      --config.init_from.ijepa.workdir=workdirs/ijepa_sim --workdir=workdirs/sonichu_from_ijepa

The backbone is the target (EMA) encoder, which the I-JEPA paper evaluates and the pretraining run
keeps in its 'target' collection: `collections` {'params': 'target'} and `map` ('encoder',
'backbone') put it into the keypoint model's parameters (docs/ijepa.md, "The target encoder
downstream").
"""
import os

import ml_collections as mlc

from launch import config_utils


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """keypoints.py's config for `arg` ('sim' or none) with `init_from.ijepa`."""
  c = config_utils.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'keypoints.py')
      + (f':{arg}' if arg else ''))
  c.init_from = mlc.ConfigDict()
  # Pretraining keeps no best/ (no validation metric ranks representations): its last state.
  c.init_from.ijepa = mlc.ConfigDict(dict(
      workdir='', checkpoint='latest', map=[('encoder', 'backbone')], reinit=[],
      collections={'params': 'target'}))
  return c
