"""Mesh, shardings and process set-up: one 'data' axis over every device of every process.

Data parallelism: the batch is split over 'data' and the train state is replicated. With FSDP on,
every state leaf of at least `fsdp_min_size_mb` is split along its largest axis divisible by the
number of devices (big_vision's `fsdp` rule); parameters and their Adam moments get the same
sharding because the rule only looks at shapes. XLA inserts the collectives.
"""
from collections.abc import Mapping
import os

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from ultrasound_common import errors

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes).

  Devices are grouped by process (process 0's first, in `jax.make_mesh`'s topology-aware order
  within a process), so that the global batch is the concatenation of the processes' local
  batches in process order; see `global_batch`. Auto axis types keep linen's logical-constraint
  helpers usable (they fail under Explicit axes).
  """
  devices = jax.devices() if devices is None else list(devices)
  ordered = jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                          devices=devices).devices.ravel()
  ordered = sorted(ordered, key=lambda d: d.process_index)  # stable: keeps the in-process order
  return Mesh(np.asarray(ordered), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; a prefix for every array of a batch dict."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Splits the largest axis of `shape` that `num_shards` divides; P() if there is none."""
  for axis in sorted(range(len(shape)), key=lambda a: shape[a], reverse=True):
    if shape[axis] >= num_shards and shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state, *, fsdp: bool = False,
                    fsdp_min_size_mb: float = 4.0):
  """NamedShardings for a tree of ShapeDtypeStructs: replicated, or FSDP for large leaves."""
  num_shards = mesh.shape[DATA_AXIS]

  def leaf_sharding(leaf):
    if not fsdp or num_shards == 1 or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return replicated(mesh)
    if np.prod(leaf.shape) * leaf.dtype.itemsize < fsdp_min_size_mb * 2**20:
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(leaf.shape, num_shards))

  return jax.tree.map(leaf_sharding, abstract_state)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded on the batch axis.

  With a `make_mesh` mesh the global batch is the concatenation of the local batches in process
  order (rows stay on the devices of the process that read them). If process p's batch j holds
  rows [p*b, (p+1)*b) of the single-process batch j, the global batch equals it row for row, and
  so does any per-row randomness drawn inside the step (e.g. dropout masks).
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _cluster_environment() -> str | None:
  """Names the multi-process launcher found in the environment, if any.

  Only launchers that start several processes count: calling `jax.distributed.initialize()` on a
  single-process job is useless and, on some platforms, fails.
  """
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env:
    return 'SLURM'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'multi-host Cloud TPU'
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when asked to, or when a cluster launcher is detected.

  Must run before anything touches a JAX backend.

  Args:
    coordinator_address: 'host:port' of process 0; with num_processes and process_id this starts
      an explicit multi-process run (e.g. several processes on one machine, or plain SSH).
    num_processes: total number of processes.
    process_id: index of this process.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.InputError(
          'distributed set-up needs all of coordinator_address, num_processes and '
          f'process_id; got {coordinator_address=}, {num_processes=}, {process_id=}')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id))
  elif (cluster := _cluster_environment()) is not None:
    logging.info('Multi-process launcher detected (%s): jax.distributed.initialize()', cluster)
    jax.distributed.initialize()
  else:
    return
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
