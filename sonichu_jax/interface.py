"""What `launch` calls for SONICHU (the protocol is in launch/models.py; registered in setup.cfg).

- `launch.predict IMAGE [IMAGE ...] --task=TASK`: keypoints, measurements and overlays
  (`predict.py`).
- `launch.convert --model=sonichu`: a SONICHU-layout weights file in (`convert.py`).
- `launch.benchmark --bench=inference --model=sonichu`: batched inference against the same
  network in PyTorch (`benchmarks.py`).
Training, evaluation and export are the experiment's (`experiments/keypoints.py`).
"""
import os

from absl import flags
import ml_collections

from sonichu_jax import benchmarks
from sonichu_jax import convert
from sonichu_jax import predict
from sonichu_jax.experiments import keypoints
from sonichu_jax.models import sonichu
from ultrasound_common import errors

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                       'sonichu', 'keypoints.py')
PREDICTION_LAYOUT = 'files'  # <image>_<task>.json and .png side by side in the output folder.


def define_predict_flags() -> None:
  """Flags of `launch.predict` for keypoint models."""
  flags.DEFINE_string('task', None, 'SONICHU: the task of the images, e.g. fetal_femur.')


def plan_predictions(run, inputs: list[str], flag_values):
  """One (name, write) per image file given as an argument (`predict.py`)."""
  return predict.plan(run, inputs, flag_values.task)


CONVERTERS = {'sonichu': 'a SONICHU-124M file in the SONICHU layout (.safetensors or torch.save: '
                         'timm backbone names under backbone., mmpose head names under '
                         'heads.{task}.)'}


def converter_config(name: str, variant: str) -> str:
  """configs/sonichu/keypoints.py with its `variant` ('full' or 'sim')."""
  del name  # One converter.
  return f'{_CONFIG}:{variant}'


def from_torch(name: str, state_dict, config: ml_collections.ConfigDict, *, source: str,
               allow_reinit: str | None, seed: int):
  """(variables, config) of a SONICHU-layout state dict; strict, nothing re-initialised."""
  del name, seed  # One converter; nothing is initialised.
  if allow_reinit:
    raise errors.InputError('--allow_reinit is for DualTrack position tables, not --model=sonichu')
  template = sonichu.abstract_variables(keypoints.build_model(config))
  return convert.from_sonichu(state_dict, template, source=source), config


INFERENCE_BENCHMARKS = {'sonichu': benchmarks.cases}
