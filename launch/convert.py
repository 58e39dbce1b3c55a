r"""Converts DualTrack and SONICHU checkpoints between PyTorch files and our run folders.

  python -m launch.convert --from=dualtrack_final.pt --to=workdirs/dualtrack_2024 \
      --model=tus_rec_2024
  python -m launch.convert --from=WORKDIR_OR_STEP_DIR --to=model.pt --direction=to_torch

--direction=from_torch (default) reads a `torch.save` file (a raw state dict or a training
checkpoint of the original; torch is not needed) and writes `--to` as a run folder holding one
Orbax checkpoint, `best/0/`, with the config of the model, so that `launch.evaluate --workdir=TO`
and everything else that reads a run's best checkpoint use it. --model:
  tus_rec_2024  the released `dualtrack_final.pt` (DualTrack, P = 1024);
  tus_rec_2025  the 2025 finetune (P = 4096, the original's torch.chunk CNN chunking);
                both with the config of configs/dualtrack/fusion.py, set to the preset and to the
                released models' evaluation inputs (global: full frame resized, raw [0, 1]);
  local_stage1  a stage-1 `VideoResnetTrackingEstimator`; the CNN's widths and temporal kernels
                are read from the checkpoint, the rest of the config is
                configs/dualtrack/local_stage1.py;
  sonichu       a SONICHU-124M file in the SONICHU layout (.safetensors or torch.save: timm
                backbone names under `backbone.`, mmpose head names under `heads.{task}.`), with
                the config of configs/sonichu/keypoints.py.
The conversion is strict (every tensor used, every shape checked). --allow_reinit=REGEX
re-initialises, with a log line each, the tensors whose torch key matches and whose shape differs:
  --model=tus_rec_2025 --allow_reinit='pos_emb|distance_embedding'
starts the 2025 model from the 2024 weights with fresh position tables, as the original's
finetuning stage 0 does silently (spec section 14).

--direction=to_torch reads a run folder (its best checkpoint, else the latest) or a step folder of
any DualTrack stage (local stages 1-3, global encoder, fusion and the 2025 finetuning) and writes a
raw state dict that the original's model of that stage loads with `load_state_dict(strict=True)`;
this needs torch (`pip install 'ultrasound-jax[convert]'`).

Outputs are written to a temporary name and renamed when complete: a failed conversion leaves
nothing, and an existing `--to` is never overwritten.
"""
import os
import shutil
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtrack_jax import convert
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import local_encoder
from launch import checkpointing
from launch import config_utils
from launch import metric_writer
from launch import torch_io
from sonichu_jax import convert as sonichu_convert
from sonichu_jax.experiments import keypoints
from sonichu_jax.models import sonichu

MODELS = ('tus_rec_2024', 'tus_rec_2025', 'local_stage1', 'sonichu')
# The table of each experiment's variables (to_torch finds the experiment in the saved config).
TABLES = {'dualtrack_jax.experiments.local_stage1': convert.LOCAL_STAGE1,
          'dualtrack_jax.experiments.local_stage2': convert.LOCAL_STAGE2,
          'dualtrack_jax.experiments.local_stage3': convert.LOCAL_STAGE3,
          'dualtrack_jax.experiments.global_encoder': convert.GLOBAL_ENCODER,
          'dualtrack_jax.experiments.fusion': convert.DUALTRACK}
_PRESETS = {'tus_rec_2024': dualtrack.TUS_REC_2024, 'tus_rec_2025': dualtrack.TUS_REC_2025}
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'dualtrack')


def _local_stage1_architecture(state_dict: dict[str, np.ndarray], source: str) -> dict[str, Any]:
  """widths, stem_width and temporal_kernels of a `VideoResnetTrackingEstimator` state dict."""
  def kernel(key: str) -> tuple[int, ...]:
    if key not in state_dict or state_dict[key].ndim != 5:
      raise ValueError(f'{source}: not a stage-1 local encoder (VideoResnetTrackingEstimator) '
                       f'state dict: no Conv3d weight {key}')
    return state_dict[key].shape
  layers = [kernel(f'backbone.layer{i}.0.conv1.0.weight') for i in range(1, 5)]
  return dict(widths=tuple(k[0] for k in layers), stem_width=kernel('backbone.stem.0.weight')[0],
              temporal_kernels=tuple(k[2] for k in layers))


def _frames(height: int, width: int) -> jax.ShapeDtypeStruct:
  # Two frames of one sweep: any sweep shape gives the same variables (the local encoder's ViT
  # needs 256 x 256 frames in the released models).
  return jax.ShapeDtypeStruct((1, 2, height, width), jnp.float32)


def _model_and_config(model: str, state_dict: dict[str, np.ndarray], source: str):
  """(module, abstract inputs for init, config dict saved with the checkpoint)."""
  if model == 'local_stage1':
    config = config_utils.load_config_file(os.path.join(_CONFIGS, 'local_stage1.py'))
    config.model.update(_local_stage1_architecture(state_dict, source))
    module = local_encoder.LocalEncoderStage1(
        widths=tuple(config.model.widths), stem_width=config.model.stem_width,
        temporal_kernels=tuple(config.model.temporal_kernels))
    return module, (_frames(32, 32),), config_utils.to_json_dict(config)
  if model in _PRESETS:
    config = config_utils.load_config_file(os.path.join(_CONFIGS, 'fusion.py'))
    config.model.update(dict(_PRESETS[model]))
    # What the released models are evaluated with (spec 8): full frames resized to 224 x 224,
    # raw [0, 1]. The weights are complete: nothing to initialise from other runs.
    config.data.global_source = 'resize'
    config.data.global_normalize = (0.0, 1.0)
    config.init_from = ml_collections.ConfigDict()
    if model == 'tus_rec_2025':
      config.data.dataset = 'tus-rec-2025'
    module = dualtrack.DualTrack(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in config.model.items()})
    return module, (_frames(256, 256), _frames(224, 224)), config_utils.to_json_dict(config)
  raise ValueError(f'--model must be one of {", ".join(MODELS)}; got {model!r}')


def _check_new(path: str) -> None:
  if os.path.lexists(path):
    raise FileExistsError(f'{path} exists; conversions never overwrite, choose a new --to')


def _sonichu_variables(source: str, variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, config dict) of a SONICHU-layout weights file."""
  config = config_utils.load_config_file(os.path.join(
      os.path.dirname(_CONFIGS), 'sonichu', f'keypoints.py:{variant}'))
  state_dict = (torch_io.read_safetensors(source) if source.endswith('.safetensors')
                else torch_io.load_state_dict(source))
  template = sonichu.abstract_variables(keypoints.build_model(config))
  return (sonichu_convert.from_sonichu(state_dict, template, source=source),
          config_utils.to_json_dict(config))


def _write_run(variables, config: dict[str, Any], out: str) -> None:
  """Writes `out/best/0` under a temporary name, renamed when complete."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(os.path.abspath(out))}.tmp-')
  try:
    checkpointing.save_variables(os.path.join(tmp, checkpointing.BEST_DIR), 0, variables, config)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def convert_from_torch(source: str, out: str, model: str, *, allow_reinit: str | None = None,
                       seed: int = 0, variant: str = 'full') -> dict[str, Any]:
  """torch.save (or SONICHU safetensors) file -> run folder `out` with `best/0`; returns the
  variables written. `variant` picks configs/sonichu/keypoints.py's variant for --model=sonichu."""
  _check_new(out)
  if model == 'sonichu':
    if allow_reinit:
      raise ValueError('--allow_reinit is for DualTrack position tables, not --model=sonichu')
    variables, config = _sonichu_variables(source, variant)
    variables = jax.tree.map(jnp.asarray, variables)
    _write_run(variables, config, out)
    logging.info('Wrote %s (sonichu).', out)
    return variables
  state_dict = torch_io.load_state_dict(source)
  module, inputs, config = _model_and_config(model, state_dict, source)
  rng = jax.random.key(seed)
  # Shapes suffice for a strict conversion; re-initialising needs initial values, which
  # lazy_init computes without running (or compiling) the forward pass.
  template = (module.lazy_init(rng, *inputs) if allow_reinit
              else jax.eval_shape(module.init, rng, *inputs))
  table = TABLES[config['experiment']]
  try:
    variables = convert.from_torch(state_dict, template, table, allow_reinit=allow_reinit)
  except ValueError as e:
    raise ValueError(f'{source} (--model={model}): {e}') from None
  variables = jax.tree.map(jnp.asarray, variables)
  _write_run(variables, config, out)
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  logging.info('Wrote %s (%s: %d tensors, %d parameters).', out, model, len(state_dict), count)
  return variables


def _fold_target_scaling(variables, model_config) -> dict[str, Any]:
  """Folds stage 1's `fc(x) * target_std + target_mean` into `fc`: the original has no scaling."""
  std = np.asarray(model_config.get('target_std') or np.ones(6), np.float32)
  mean = np.asarray(model_config.get('target_mean') or np.zeros(6), np.float32)
  fc = variables['params']['fc']
  folded = {'kernel': np.asarray(fc['kernel']) * std, 'bias': np.asarray(fc['bias']) * std + mean}
  return {**variables, 'params': {**variables['params'], 'fc': folded}}


def convert_to_torch(source: str, out: str) -> dict[str, np.ndarray]:
  """Run folder (best, else latest checkpoint) or step folder -> raw state dict `out`."""
  _check_new(out)
  step_dir = os.path.basename(os.path.normpath(source)).isdigit()
  directory, step = checkpointing.find_checkpoint(source, source if step_dir else 'best')
  variables, config = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  experiment = config.get('experiment')
  if experiment not in TABLES:
    raise ValueError(f'{directory}/{step}: config.experiment {experiment!r} has no torch '
                     f'counterpart here; supported: {", ".join(sorted(TABLES))}')
  if experiment == 'dualtrack_jax.experiments.local_stage1':
    variables = _fold_target_scaling(variables, config['model'])
  state_dict = convert.to_torch(variables, TABLES[experiment])
  torch_io.save_state_dict(out, state_dict)
  logging.info('Wrote %s (%d tensors) from %s/%d.', out, len(state_dict), directory, step)
  return state_dict


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('from', None, 'torch.save file (from_torch), or a run / step folder.')
  flags.DEFINE_string('to', None, 'New run folder (from_torch) or .pt file (to_torch).')
  flags.DEFINE_enum('direction', 'from_torch', ['from_torch', 'to_torch'], 'Which way.')
  flags.DEFINE_enum('model', None, list(MODELS), 'The model of the torch file (from_torch).')
  flags.DEFINE_string('allow_reinit', None, 'Regex over torch keys: re-initialise those tensors '
                      'if their shape differs from the model (from_torch).')
  flags.DEFINE_integer('seed', 0, 'Seed of the initialisation used by --allow_reinit.')
  flags.DEFINE_string('variant', 'full', "--model=sonichu: the variant of "
                      "configs/sonichu/keypoints.py ('full' or 'sim').")
  flags.mark_flags_as_required(['from', 'to'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  source = f['from'].value
  metric_writer.quiet_library_logs()
  try:
    if f.direction == 'from_torch':
      if f.model is None:
        raise app.UsageError('--model is required with --direction=from_torch')
      convert_from_torch(source, f.to, f.model, allow_reinit=f.allow_reinit, seed=f.seed,
                         variant=f.variant)
    else:
      if f.model or f.allow_reinit:
        raise app.UsageError('--model and --allow_reinit apply to --direction=from_torch only '
                             '(to_torch reads the model from the checkpoint config)')
      convert_to_torch(source, f.to)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    sys.exit(f'ERROR: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
