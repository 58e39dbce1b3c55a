r"""Converts checkpoints between PyTorch files and our run folders.

  python -m launch.convert --from=dualtrack_final.pt --to=workdirs/dualtrack_2024 \
      --model=tus_rec_2024
  python -m launch.convert --from=WORKDIR_OR_STEP_DIR --to=model.pt --direction=to_torch

--direction=from_torch (default) reads a `torch.save` file (a raw state dict or a training
checkpoint of the original; torch is not needed) or a `.safetensors` file, and writes `--to` as a
run folder holding one Orbax checkpoint, `best/0/`, with the config of the model, so that
`launch.evaluate --workdir=TO` and everything else that reads a run's best checkpoint use it.
--model names a converter of a registered model package (launch/models.py); `--help` and an
unknown name list them. Today:
  tus_rec_2024  the released `dualtrack_final.pt` (DualTrack, P = 1024);
  tus_rec_2025  the 2025 finetune (P = 4096, the original's torch.chunk CNN chunking);
                both with the config of configs/dualtrack/fusion.py, set to the preset and to the
                released models' evaluation inputs (global: full frame resized, raw [0, 1]);
  local_stage1  a stage-1 `VideoResnetTrackingEstimator`; the CNN's widths and temporal kernels
                are read from the checkpoint, the rest of the config is
                configs/dualtrack/local_stage1.py;
  sonichu       a SONICHU-124M file in the SONICHU layout (.safetensors or torch.save: timm
                backbone names under `backbone.`, mmpose head names under `heads.{task}.`), with
                the config of configs/sonichu/keypoints.py (--variant picks full or sim);
  ijepa         an official I-JEPA training checkpoint (encoder, predictor, target encoder; any
                size: read from the tensors) as an I-JEPA pretraining run, with the config of
                configs/sonichu/pretrain_ijepa.py.
The conversion is strict (every tensor used, every shape checked). --allow_reinit=REGEX
re-initialises, with a log line each, the tensors whose torch key matches and whose shape differs:
  --model=tus_rec_2025 --allow_reinit='pos_emb|distance_embedding'
starts the 2025 model from the 2024 weights with fresh position tables, as the original's
finetuning stage 0 does silently (it loads with a loader that drops every tensor whose shape
differs).

--direction=to_torch reads a run folder (its best checkpoint, else the latest) or a step folder
whose model package converts back (every DualTrack stage: local stages 1-3, global encoder, fusion
and the 2025 finetuning) and writes a raw state dict that the original's model of that stage loads
with `load_state_dict(strict=True)`; an I-JEPA pretraining run becomes the original's training
checkpoint, which its `load_checkpoint` resumes from; this needs torch
(`pip install 'ultrasound-jax[convert]'`).

Outputs are written to a temporary name and renamed when complete: a failed conversion leaves
nothing, and an existing `--to` is never overwritten.
"""
import os
import shutil
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from launch import checkpointing
from launch import config_utils
from launch import metric_writer
from launch import models
from launch import torch_io
from launch import xla_flags
from ultrasound_common import errors


def _check_new(path: str) -> None:
  if os.path.lexists(path):
    raise errors.ExistsError(f'{path} exists; conversions never overwrite, choose a new --to')


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
  """torch.save or safetensors file -> run folder `out` with `best/0`; returns the variables.

  `variant` is the argument of the converter's config file (e.g. SONICHU's 'full' or 'sim').
  """
  _check_new(out)
  package, _ = models.lookup('CONVERTERS', model, '--model')
  config_file = models.function(package, 'converter_config', 'conversions')(model, variant)
  config = config_utils.load_config_file(config_file)
  state_dict = torch_io.read_state_dict(source)
  variables, config = models.function(package, 'from_torch', 'conversions from PyTorch')(
      model, state_dict, config, source=source, allow_reinit=allow_reinit, seed=seed)
  variables = jax.tree.map(jnp.asarray, variables)
  _write_run(variables, config_utils.to_json_dict(config), out)
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  logging.info('Wrote %s (%s: %d tensors, %d parameters).', out, model, len(state_dict), count)
  return variables


def convert_to_torch(source: str, out: str) -> dict[str, np.ndarray]:
  """Run folder (best, else latest checkpoint) or step folder -> raw state dict `out`."""
  _check_new(out)
  step_dir = os.path.basename(os.path.normpath(source)).isdigit()
  directory, step = checkpointing.find_checkpoint(source, source if step_dir else 'best')
  variables, config = checkpointing.restore_variables(
      directory, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  where = f'{directory}/{step}'
  package = models.for_experiment(config.get('experiment'))
  to_torch = models.function(package, 'to_torch', 'conversions to PyTorch')
  state_dict = to_torch(variables, config, source=where)
  torch_io.save_state_dict(out, state_dict)
  logging.info('Wrote %s (%d tensors) from %s.', out, len(state_dict), where)
  return state_dict


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  names = ', '.join(f'{name} ({description})' for name, (_, description)
                    in sorted(models.named('CONVERTERS').items()))
  flags.DEFINE_string('from', None, 'torch.save or .safetensors file (from_torch), or a run / '
                      'step folder (to_torch).')
  flags.DEFINE_string('to', None, 'New run folder (from_torch) or .pt file (to_torch).')
  flags.DEFINE_enum('direction', 'from_torch', ['from_torch', 'to_torch'], 'Which way.')
  flags.DEFINE_string('model', None, f'The model of the torch file (from_torch): {names}.')
  flags.DEFINE_string('allow_reinit', None, 'Regex over torch keys: re-initialise those tensors '
                      'if their shape differs from the model (from_torch).')
  flags.DEFINE_integer('seed', 0, 'Seed of the initialisation used by --allow_reinit.')
  flags.DEFINE_string('variant', 'full', "The variant of the converter's config file, e.g. "
                      "--model=sonichu: 'full' or 'sim' of configs/sonichu/keypoints.py.")
  flags.mark_flags_as_required(['from', 'to'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_flags.apply_defaults()
  f = flags.FLAGS
  source = f['from'].value
  metric_writer.quiet_library_logs()
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


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.convert')
