"""Reading run checkpoints from model packages (the reading side of `launch.checkpointing`).

Model packages do not import `launch`; some still read other runs' weights while they build
themselves: frozen encoders whose features a cache stores, teachers, fixed I-JEPA targets. A run
folder holds `best/<step>/` and `checkpoints/<step>/`, each with the items 'state' (its
'variables' subtree is the model's) and 'config' (the run's config as JSON).
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ultrasound_common import errors

STATE, CONFIG = 'state', 'config'

# What reading a damaged checkpoint raises: Orbax and TensorStore report missing or cut files as
# ValueError (JSONDecodeError included) or OSError.
DAMAGE = (ValueError, OSError)


class CheckpointError(errors.InputError):
  """A checkpoint cannot be read (damaged, truncated) or does not fit the run's model."""


def _latest_step(directory: str) -> int | None:
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=None)


def find_step(path: str, checkpoint: str = 'best') -> tuple[str, int]:
  """(manager directory, step) of a run folder's best (else latest) checkpoint, of its step
  `checkpoint` (digits) among checkpoints/, or of a step directory given as `path`."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(path).isdigit():
    if not os.path.isdir(path):
      raise errors.MissingFileError(f'{path}: no such checkpoint directory')
    return os.path.dirname(path), int(os.path.basename(path))
  if checkpoint.isdigit():
    directory = os.path.join(path, 'checkpoints')
    if not os.path.isdir(os.path.join(directory, checkpoint)):
      raise errors.MissingFileError(f'{path}: no checkpoint at step {checkpoint} in checkpoints/')
    return directory, int(checkpoint)
  order = ('best', 'checkpoints') if checkpoint == 'best' else ('checkpoints',)
  for name in order:
    step = _latest_step(os.path.join(path, name))
    if step is not None:
      return os.path.join(path, name), step
  raise errors.MissingFileError(f'{path}: no checkpoint (looked in {" and ".join(order)}/)')


def restore(manager: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, config dict) of a checkpoint step, without the optimiser state.

  Args:
    manager: a manager of a `checkpoints/` or `best/` directory, with handlers for the items
      'state' (a PyTree handler, for the partial restore) and 'config'.
    step: the step to read.
    sharding: where to put every variable; the saved device layout does not matter.

  Raises:
    CheckpointError: the step cannot be read (damaged or truncated files); names its folder.
  """
  try:
    target = {'variables': jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        manager.item_metadata(step)[STATE]['variables'])}
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        CONFIG: ocp.args.JsonRestore()}))
  except DAMAGE as e:
    raise CheckpointError(f'{os.path.join(manager.directory, str(step))}: cannot read the '
                          f'checkpoint (damaged or truncated?): {type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}') from e
  return restored[STATE]['variables'], restored[CONFIG]


def _manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()})


def read_variables(path: str, checkpoint: str = 'best') -> dict[str, Any]:
  """Variables of a run's checkpoint (`find_step`), on the first device."""
  directory, step = find_step(path, checkpoint)
  manager = _manager(directory)
  try:
    return restore(manager, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))[0]
  finally:
    manager.close()


def read_config(path: str, checkpoint: str = 'best') -> dict[str, Any]:
  """The config (JSON dict) saved with a run's checkpoint (`find_step`)."""
  directory, step = find_step(path, checkpoint)
  manager = _manager(directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return restored[CONFIG]
  finally:
    manager.close()
