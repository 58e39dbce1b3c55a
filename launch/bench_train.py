"""Training-step throughput of a config's experiment (`launch.benchmark --bench=train`).

The step is the trainer's own (`launch.trainer.make_train_step` with the config's frozen
parameters and the experiment's step constants, sharded over every device), compiled ahead of
time so that compilation is timed apart. The same global batch (the first of the experiment's
training data) is fed every step, so data loading is not counted. Samples are batch rows
(DualTrack windows, SONICHU images).

With an original (`--original=PATH`), the same step in PyTorch on the same batch: the model
package's `TORCH_TRAIN_STEPS[config.experiment](config, batch, original=, device=)` returns a
function that runs one optimiser step (forward, loss, backward, update) of the original network on
that device (CUDA when torch sees one); it is timed like ours, optionally under
`torch.autocast(bfloat16)`.
"""
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from launch import bench_inference
from launch import experiment as experiment_lib
from launch import models
from launch import optim
from launch import sharding
from launch import trainer


def first_batch(experiment) -> dict[str, np.ndarray]:
  """The first batch of the experiment's training data (this process's rows)."""
  it = iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1))
  batch = next(it)
  it.close()
  return batch


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """Compile seconds, median and p90 step seconds, samples/s and achieved FLOP/s."""
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    experiment = experiment_lib.load_experiment(config)
    local = first_batch(experiment)
    batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
    frozen = tuple(config.get('frozen') or ())
    tx, schedule = optim.make_optimizer(config.optim, total_steps=10**6, warmup_steps=0,
                                        frozen=frozen)
    init_fn = functools.partial(trainer.init_state, experiment, tx)
    rng = jax.random.key(0)
    state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init_fn, rng, batch))
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng, batch)
    constants = trainer.step_constants(experiment, state['variables'], mesh)
    step = jax.jit(trainer.make_train_step(experiment, tx, schedule, frozen),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                                 sharding.replicated(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch, constants).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get('flops') or None
    state, _ = compiled(state, batch, constants)  # Warm-up.
    jax.block_until_ready(state)
    times = []
    with bench_inference.PeakRss() as peak:
      for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, constants)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
  median = float(np.median(times))
  device = jax.devices()[0]
  return {
      'side': 'jax', 'label': f'train {config.experiment}', 'experiment': config.experiment,
      'batch': {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in local.items()},
      'compute_dtype': config.get('compute_dtype', 'float32'), 'devices': jax.device_count(),
      'compile_s': compile_s, 'median_s': median, 'p90_s': float(np.percentile(times, 90)),
      'items': len(next(iter(local.values()))), 'item_name': 'samples',
      'items_per_s': len(next(iter(local.values()))) / median, 'flops': flops,
      'flops_per_s': flops / median if flops else None, 'peak_rss': peak.peak,
      'device_peak': ((device.memory_stats() or {}).get('peak_bytes_in_use')
                      if device.platform != 'cpu' else None)}


def measure_torch(config: ml_collections.ConfigDict, steps: int, *, original: str,
                  dtype: str = 'float32') -> dict[str, Any]:
  """The original's training step on our first batch: median and p90 seconds, samples/s."""
  import torch  # Only with an original: the project itself never needs torch.

  package = models.for_experiment(config.experiment)
  make_step = dict(getattr(package, 'TORCH_TRAIN_STEPS', {}) or {}).get(config.experiment)
  if make_step is None:
    raise models.ModelPackageError(
        f'{package.__name__} offers no PyTorch training step for {config.experiment} '
        '(TORCH_TRAIN_STEPS)')
  batch = first_batch(experiment_lib.load_experiment(config))
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  step = make_step(config, batch, original=original, device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def call():
    with autocast:
      step()
    if device == 'cuda':
      torch.cuda.synchronize()

  call()  # Warm-up (allocates the optimiser state).
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = []
  with bench_inference.PeakRss() as peak:
    for _ in range(steps):
      start = time.perf_counter()
      call()
      times.append(time.perf_counter() - start)
  median = float(np.median(times))
  items = len(next(iter(batch.values())))
  return {
      'side': 'torch eager' + ('' if dtype == 'float32' else f' {dtype}'),
      'label': f'train {config.experiment} (original)', 'median_s': median,
      'p90_s': float(np.percentile(times, 90)), 'items': items, 'item_name': 'samples',
      'items_per_s': items / median, 'peak_rss': peak.peak,
      'device_peak': torch.cuda.max_memory_allocated() if device == 'cuda' else None}


def print_measurement(m: dict[str, Any], original: dict[str, Any] | None = None) -> None:
  """Ours (and the original's step, with the throughput ratio) as a few lines."""
  shapes = ', '.join(f'{k} {tuple(shape)} {dtype}' for k, (shape, dtype) in m['batch'].items())
  print(f'{m["label"]}: batch {shapes}; {m["compute_dtype"]}, {m["devices"]} device(s)')
  print(f'  compile {m["compile_s"]:.1f} s; step median {m["median_s"] * 1e3:.0f} ms, p90 '
        f'{m["p90_s"] * 1e3:.0f} ms; {m["items_per_s"]:.3g} samples/s' +
        (f'; {m["flops_per_s"] / 1e9:.1f} GFLOP/s achieved' if m['flops_per_s'] else ''))
  if original:
    print(f'  original ({original["side"]}): step median {original["median_s"] * 1e3:.0f} ms, '
          f'p90 {original["p90_s"] * 1e3:.0f} ms; {original["items_per_s"]:.3g} samples/s; '
          f'ours {m["items_per_s"] / original["items_per_s"]:.2f}x its throughput')
