"""What `launch` calls for SONICHU (the protocol is in launch/models.py; registered in setup.cfg).

- `launch.predict IMAGE [IMAGE ...] --task=TASK`: keypoints, measurements and overlays
  (`predict.py`).
- `launch.convert --model=sonichu`: a SONICHU-layout weights file in (`convert.py`);
  `--model=ijepa`: an official I-JEPA training checkpoint in, and an I-JEPA run back out in that
  layout with `--direction=to_torch` (`convert_ijepa.py`).
- `launch.benchmark --bench=inference --model=sonichu`: batched inference against the same
  network in PyTorch (`benchmarks.py`).
- `launch.evaluate --workdir=A --workdir=B ... --ensemble`: each member and their coordinate-wise
  median (`ensemble.py`).
Training, evaluation and export are the experiment's (`experiments/keypoints.py`).
"""
import os

from absl import flags
import ml_collections
import numpy as np

from sonichu_jax import benchmarks
from sonichu_jax import convert
from sonichu_jax import convert_ijepa
from sonichu_jax import ensemble
from sonichu_jax import gpu_suite
from sonichu_jax import predict
from sonichu_jax import torch_steps
from sonichu_jax.data import datasets
from sonichu_jax.experiments import ijepa as ijepa_experiment
from sonichu_jax.experiments import keypoints
from sonichu_jax.models import sonichu
from ultrasound_common import errors

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                       'sonichu', 'keypoints.py')
_IJEPA_CONFIG = os.path.join(os.path.dirname(_CONFIG), 'pretrain_ijepa.py')
PREDICTION_LAYOUT = 'files'  # <image>_<task>.json and .png side by side in the output folder.


def define_predict_flags() -> None:
  """Flags of `launch.predict` for keypoint models."""
  flags.DEFINE_string('task', None, 'SONICHU: the task of the images, e.g. fetal_femur.')


def plan_predictions(run, inputs: list[str], flag_values):
  """One (name, write) per image file given as an argument (`predict.py`)."""
  return predict.plan(run, inputs, flag_values.task)


CONVERTERS = {'sonichu': 'a SONICHU-124M file in the SONICHU layout (.safetensors or torch.save: '
                         'timm backbone names under backbone., mmpose head names under '
                         'heads.{task}.)',
              'ijepa': "an official I-JEPA training checkpoint (src/train.py's save_checkpoint: "
                       'encoder, predictor and target encoder, any size)'}


def converter_config(name: str, variant: str) -> str:
  """configs/sonichu/keypoints.py (or pretrain_ijepa.py for 'ijepa') with its `variant`
  ('full' or 'sim'); 'ijepa' then sets the architecture from the checkpoint."""
  return f'{_IJEPA_CONFIG if name == "ijepa" else _CONFIG}:{variant}'


def from_torch(name: str, state_dict, config: ml_collections.ConfigDict, *, source: str,
               allow_reinit: str | None, seed: int):
  """(variables, config) of a SONICHU-layout state dict or an I-JEPA checkpoint ('ijepa', its
  entries flattened as '<entry>.<key>'); strict, nothing re-initialised."""
  del seed  # Nothing is initialised.
  if allow_reinit:
    raise errors.InputError(f'--allow_reinit is for DualTrack position tables, not --model={name}')
  if name == 'ijepa':
    return _from_ijepa(state_dict, config, source)
  template = sonichu.abstract_variables(keypoints.build_model(config))
  return convert.from_sonichu(state_dict, template, source=source), config


def _from_ijepa(state_dict, config: ml_collections.ConfigDict, source: str):
  """An I-JEPA run's variables (target step 0: nothing pending) and config, sized as the file."""
  checkpoint = convert_ijepa.split_entries(state_dict, source)
  arch = convert_ijepa.architecture(checkpoint, source, int(config.model.num_heads))
  config.model.update(arch['model'])
  config.predictor.update(arch['predictor'])
  config.data.image_size = arch['image_size']
  model = ijepa_experiment.build_model(config)
  variables = convert_ijepa.from_ijepa(checkpoint, model, arch['image_size'], source=source)
  variables['target']['step'] = np.zeros((), np.int32)
  return variables, config


def to_torch(variables, config, *, source: str):
  """An I-JEPA run in the original's training-checkpoint layout (`convert_ijepa.
  training_checkpoint`), its target encoder with the last step's pending EMA update applied."""
  if config.get('experiment') != ijepa_experiment.__name__:
    raise errors.InputError(f'{source}: config.experiment {config.get("experiment")!r} has no '
                            f'torch counterpart here; supported: {ijepa_experiment.__name__}')
  config = ml_collections.ConfigDict(config)  # The checkpoint's JSON config.
  experiment = ijepa_experiment.Experiment(config, load_data=False)
  step = int(variables['target']['step'])
  # The steps per epoch (for the pending EMA's momentum and the epoch count) list a folder's
  # training images: only needed after some training.
  target = experiment.target_encoder(variables) if step else variables['target']['encoder']
  o = config.optim
  return convert_ijepa.training_checkpoint(
      {**variables, 'target': {'encoder': target}}, experiment.model.predictor,
      epoch=step // experiment.steps_per_epoch if step else 0, lr=float(o.lr),
      weight_decay=float(o.weight_decay),
      betas=(float(o.b1), float(o.b2)), eps=float(o.eps), batch_size=int(config.batch_size),
      bf16=config.compute_dtype == 'bfloat16')


def evaluate_ensemble(checkpoints: list[str], config: ml_collections.ConfigDict):
  """Each member's metrics and the coordinate-wise median's, on `config`'s validation records."""
  members = ensemble.load_members(checkpoints)
  per_member, combined = ensemble.evaluate_records(
      members, datasets.load_split(config.data, 'val'), batch_size=int(config.eval_batch_size),
      tta=bool(config.eval_tta))
  return per_member, {ensemble.MEDIAN: combined}


INFERENCE_BENCHMARKS = {'sonichu': benchmarks.cases}
BENCHMARKS = {'ensemble': ensemble.benchmark}
BENCHMARK_SUITES = {'gpu': gpu_suite.cases}
TORCH_TRAIN_STEPS = torch_steps.TORCH_TRAIN_STEPS
