"""What `launch` calls for DualTrack (the protocol is in launch/models.py; registered in setup.cfg).

- `launch.predict`: whole sweeps from h5 files or a dataset (`predict.py`): poses, trajectory,
  volume and, with tracking in the file, the metrics; or a TUS-REC submission (`submission.py`).
- `launch.convert`: the released PyTorch checkpoints and stage-1 models in (`CONVERTERS`), any
  stage's run back to the original's state dict.
- `launch.benchmark`: whole-sweep inference against the original, the simulator and the pipeline
  (`benchmarks.py`).
Training, evaluation and export are the experiments' (`experiments/`).
"""
import os
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import baseline_benchmarks
from dualtrack_jax import benchmarks
from dualtrack_jax import convert
from dualtrack_jax import gpu_suite
from dualtrack_jax import plots
from dualtrack_jax import predict
from dualtrack_jax import submission
from dualtrack_jax import torch_steps
from dualtrack_jax import volume
from dualtrack_jax.experiments import baseline_two_frame
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import local_encoder
from ultrasound_common import errors

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'dualtrack')
_EXPERIMENTS = 'dualtrack_jax.experiments.'
PREDICTION_LAYOUT = 'folders'  # One folder of outputs per sweep.


def define_predict_flags() -> None:
  """Flags of `launch.predict` for sweep models."""
  flags.DEFINE_multi_string('sweep', None, 'DualTrack: an h5 sweep file to predict (repeatable).')
  flags.DEFINE_string('dataset', None, "DualTrack: registered dataset name, sweep CSV or "
                      "'synthetic' (the run config's simulated dataset).")
  flags.DEFINE_enum('split', 'val', ['train', 'val', 'test'], 'DualTrack: split of --dataset.')
  flags.DEFINE_string('registry', None, 'DualTrack: dataset registry file (default: the usual '
                      'lookup).')
  flags.DEFINE_float('spacing_mm', 0.5, 'DualTrack: voxel size of the reconstructed volume (mm).')
  flags.DEFINE_enum('volume_format', 'nii.gz', list(predict.VOLUME_FORMATS),
                    'DualTrack: volume file format.')
  flags.DEFINE_enum('compounding', 'pnn', list(volume.METHODS),
                    'DualTrack: pnn: nearest voxel; trilinear: splat to 8 voxels (smoother, 6x '
                    'slower).')
  flags.DEFINE_integer('max_voxels', volume.DEFAULT_MAX_VOXELS,
                       'DualTrack: refuse volumes with more voxels (use a larger --spacing_mm).')
  flags.DEFINE_string('tusrec_frames_dir', None, "DualTrack: write a TUS-REC submission (the four "
                      "DDFs per scan) for the challenge data's frames/ folder instead.")
  flags.DEFINE_string('tusrec_landmarks_dir', None, 'TUS-REC submission: the landmarks; default: '
                      'landmarks/ or landmark/ beside the frames folder.')
  flags.DEFINE_string('tusrec_transfs_dir', None, 'TUS-REC submission: tforms (validation data) '
                      'for the errors; default: transfs/ beside the frames folder if there is one.')
  flags.DEFINE_string('tusrec_calibration', None, 'TUS-REC submission: calib_matrix.csv; default: '
                      'the one beside the frames folder, else the built-in 2024 calibration.')
  flags.DEFINE_integer('frames_per_chunk', submission.DEFAULT_FRAMES_PER_CHUNK, 'TUS-REC '
                       'submission: frames of an all-pixel DDF computed at a time (memory).')


def plan_predictions(run, inputs: list[str], flag_values):
  """One output folder per sweep (`predict.py`), sweeps from --sweep or --dataset; or, with
  --tusrec_frames_dir, one folder with a TUS-REC submission (`submission.py`)."""
  f = flag_values
  if inputs:
    raise errors.InputError(f'DualTrack runs take --sweep=FILE.h5, --dataset=NAME or '
                            f'--tusrec_frames_dir=DIR, not arguments: {inputs}')
  if f.tusrec_frames_dir:
    if f.sweep or f.dataset:
      raise errors.InputError('--tusrec_frames_dir writes a submission: give no --sweep or '
                              '--dataset with it')
    return submission.plan(run, f.tusrec_frames_dir, landmarks_dir=f.tusrec_landmarks_dir,
                           transfs_dir=f.tusrec_transfs_dir, calibration=f.tusrec_calibration,
                           frames_per_chunk=f.frames_per_chunk)
  return predict.plan(run, sweep_paths=f.sweep or (), dataset=f.dataset, split=f.split,
                      registry=f.registry, spacing_mm=f.spacing_mm, volume_format=f.volume_format,
                      compounding=f.compounding, max_voxels=f.max_voxels)


CONVERTERS = {
    'tus_rec_2024': "the released dualtrack_final.pt (DualTrack, P = 1024)",
    'tus_rec_2025': "the 2025 finetune (P = 4096, the original's torch.chunk CNN chunking)",
    'local_stage1': 'a stage-1 VideoResnetTrackingEstimator (widths and temporal kernels read '
                    'from the file)',
    'two_frame_cnn': "train_2_frame_cnn.py's model (prevostnet[_bn], resnet10 or "
                     'efficientnet_b1: the backbone is read from the keys)',
}
_PRESETS = {'tus_rec_2024': dualtrack.TUS_REC_2024, 'tus_rec_2025': dualtrack.TUS_REC_2025}
# The table of each experiment's variables (to_torch finds the experiment in the saved config).
TABLES = {f'{_EXPERIMENTS}local_stage1': convert.LOCAL_STAGE1,
          f'{_EXPERIMENTS}local_stage2': convert.LOCAL_STAGE2,
          f'{_EXPERIMENTS}local_stage3': convert.LOCAL_STAGE3,
          f'{_EXPERIMENTS}global_encoder': convert.GLOBAL_ENCODER,
          f'{_EXPERIMENTS}fusion': convert.DUALTRACK}
_TWO_FRAME = f'{_EXPERIMENTS}baseline_two_frame'  # One table per backbone.


def _table(config) -> convert.Table:
  if config['experiment'] == _TWO_FRAME:
    return baseline_two_frame.TABLES[config['model']['backbone']]
  return TABLES[config['experiment']]


def compare_figures(results) -> dict[str, Any]:
  """`launch.evaluate` of several runs: per validation sweep, one trajectory plot with every run's
  prediction (the runs' evaluation results, {run name: EvalResult}, in legend order)."""
  return plots.sweep_comparisons({name: result.sweeps for name, result in results.items()})


def converter_config(name: str, variant: str) -> str:
  """The config file of a converted model: stage 1's, or fusion's for the released models."""
  if variant != 'full':
    raise errors.InputError(
        f'--variant={variant!r}: DualTrack conversions use the full configs only')
  files = {'local_stage1': 'local_stage1.py', 'two_frame_cnn': 'baseline_two_frame.py'}
  return os.path.join(_CONFIGS, files.get(name, 'fusion.py'))


def _local_stage1_architecture(state_dict: dict[str, np.ndarray], source: str) -> dict[str, Any]:
  """widths, stem_width and temporal_kernels of a `VideoResnetTrackingEstimator` state dict."""
  def kernel(key: str) -> tuple[int, ...]:
    if key not in state_dict or state_dict[key].ndim != 5:
      raise errors.InputError(
          f'{source}: not a stage-1 local encoder (VideoResnetTrackingEstimator) '
          f'state dict: no Conv3d weight {key}')
    return state_dict[key].shape
  layers = [kernel(f'backbone.layer{i}.0.conv1.0.weight') for i in range(1, 5)]
  return dict(widths=tuple(k[0] for k in layers), stem_width=kernel('backbone.stem.0.weight')[0],
              temporal_kernels=tuple(k[2] for k in layers))


def _frames(height: int, width: int) -> jax.ShapeDtypeStruct:
  # Two frames of one sweep: any sweep shape gives the same variables (the local encoder's ViT
  # needs 256 x 256 frames in the released models).
  return jax.ShapeDtypeStruct((1, 2, height, width), jnp.float32)


def _two_frame_backbone(state_dict: dict[str, np.ndarray], source: str
                        ) -> tuple[dict[str, Any], int]:
  """config.model keys of a train_2_frame_cnn.py state dict, from its first key's module, and
  its input channels (2 frames, plus 2 with `--optical_flow`)."""
  keys = {'conv_stem.weight': dict(backbone='efficientnet_b1'),
          'conv1.0.weight': dict(backbone='resnet10t'),
          'conv1.weight': dict(backbone='prevost', norm='batch' if 'norm1.weight' in state_dict
                               else None)}
  for key, model in keys.items():
    if key in state_dict:
      channels = int(np.shape(state_dict[key])[1])
      if channels not in (2, 4):
        raise errors.InputError(f'{source}: {key} takes {channels} input channels; a 2-frame CNN '
                                'takes 2 (the frames) or 4 (the frames and their optical flow)')
      return model, channels
  raise errors.InputError(f'{source}: not a train_2_frame_cnn.py model state dict (none of '
                          f'{", ".join(keys)})')


def _model(name: str, state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
           source: str):
  """(module, abstract inputs for init); sets the converted model's keys in `config`."""
  if name == 'two_frame_cnn':
    # The Prevost ConvNet's fc1 fixes the input size: config.data.crop (128 x 128, its own).
    model, channels = _two_frame_backbone(state_dict, source)
    config.model.update(model)
    config.data.optical_flow = channels == 4
    pairs = jax.ShapeDtypeStruct((1, *config.data.crop, channels), jnp.float32)
    return baseline_two_frame.network(config.model), (pairs,)
  if name == 'local_stage1':
    config.model.update(_local_stage1_architecture(state_dict, source))
    module = local_encoder.LocalEncoderStage1(
        widths=tuple(config.model.widths), stem_width=config.model.stem_width,
        temporal_kernels=tuple(config.model.temporal_kernels))
    return module, (_frames(32, 32),)
  config.model.update(dict(_PRESETS[name]))
  # What the released models are evaluated with: full frames resized to 224 x 224, raw [0, 1]
  # (the original's evaluation inputs). The weights are complete: nothing to initialise from
  # other runs.
  config.data.global_source = 'resize'
  config.data.global_normalize = (0.0, 1.0)
  config.init_from = ml_collections.ConfigDict()
  if name == 'tus_rec_2025':
    config.data.dataset = 'tus-rec-2025'
  module = dualtrack.DualTrack(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config.model.items()})
  return module, (_frames(256, 256), _frames(224, 224))


def from_torch(name: str, state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
               *, source: str, allow_reinit: str | None, seed: int):
  """(variables, config) of a converted checkpoint; `allow_reinit` re-initialises the tensors
  whose torch key matches it and whose shape differs (`convert.from_torch`)."""
  module, inputs = _model(name, state_dict, config, source)
  rng = jax.random.key(seed)
  # Shapes suffice for a strict conversion; re-initialising needs initial values, which
  # lazy_init computes without running (or compiling) the forward pass.
  template = (module.lazy_init(rng, *inputs) if allow_reinit
              else jax.eval_shape(module.init, rng, *inputs))
  try:
    variables = convert.from_torch(state_dict, template, _table(config),
                                   allow_reinit=allow_reinit)
  except ValueError as e:
    raise errors.InputError(f'{source} (--model={name}): {e}') from None
  return variables, config


def _fold_target_scaling(variables, model_config) -> dict[str, Any]:
  """Folds stage 1's `fc(x) * target_std + target_mean` into `fc`: the original has no scaling."""
  std = np.asarray(model_config.get('target_std') or np.ones(6), np.float32)
  mean = np.asarray(model_config.get('target_mean') or np.zeros(6), np.float32)
  fc = variables['params']['fc']
  folded = {'kernel': np.asarray(fc['kernel']) * std, 'bias': np.asarray(fc['bias']) * std + mean}
  return {**variables, 'params': {**variables['params'], 'fc': folded}}


def to_torch(variables, config, *, source: str) -> dict[str, np.ndarray]:
  """A run of any DualTrack stage -> the state dict that the original's model of that stage loads
  with `load_state_dict(strict=True)`."""
  experiment = config.get('experiment')
  if experiment not in TABLES and experiment != _TWO_FRAME:
    raise errors.InputError(
        f'{source}: config.experiment {experiment!r} has no torch counterpart here; '
        f'supported: {", ".join(sorted([*TABLES, _TWO_FRAME]))}')
  if experiment == f'{_EXPERIMENTS}local_stage1':
    variables = _fold_target_scaling(variables, config['model'])
  return convert.to_torch(variables, _table(config))


INFERENCE_BENCHMARKS = {'dualtrack': benchmarks.cases, **baseline_benchmarks.INFERENCE_BENCHMARKS}
BENCHMARK_SUITES = {'gpu': gpu_suite.cases}
TORCH_TRAIN_STEPS = torch_steps.TORCH_TRAIN_STEPS
BENCHMARKS = {'simulator': benchmarks.simulator_speed, 'pipeline': benchmarks.pipeline_speed}
