r"""Measures speed: `python -m launch.benchmark --bench=NAME [...]`; results go into BENCHMARKS.md.

Benchmarks:
  simulator  frames per second of the sweep simulator, default frames and TUS-REC-sized frames.
  pipeline   windows per second of the local-window Grain pipeline with 0 and 2 worker processes.
  train      training throughput of a config's experiment: compile time (AOT) separately, then the
             median and p90 step time and frames per second over --steps warm steps. The same global
             batch is fed every step, so data loading is not counted.
  inference  a model's inference (--model, registered in launch/bench_inference.py; what is timed
             and how memory and FLOP are measured is in its docstring) for each of --frames and
             --dtype: compile time, warm latency median and p90 over --steps calls, frames/s,
             peak memory, achieved FLOP/s; with --original=PATH also the original PyTorch model
             (same weights, same input; outputs compared first) in this process, eager and with
             --torch_compile, and the ratios. Needs torch importable only with --original.

Examples:
  python -m launch.benchmark --bench=simulator
  python -m launch.benchmark --bench=pipeline
  python -m launch.benchmark --bench=train --config=configs/dualtrack/local_stage1.py:sim
  python -m launch.benchmark --bench=train --config=configs/dualtrack/local_stage1.py \
      --config.data.dataset=synthetic --config.data.synthetic.num_train=2 ...
  python -m launch.benchmark --bench=inference --model=dualtrack --frames=64,600 \
      --dtype=float32,bfloat16 --steps=5
  python -m launch.benchmark --bench=inference --model=dualtrack --frames=64 --steps=3 \
      --original=/path/to/DualTrack --torch_compile
  python -m launch.benchmark --bench=inference --model=dualtrack --preset=tus_rec_2025 \
      --frames=4096 --tile=64 --steps=1
"""
import functools
import platform
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from dualtrack_jax.data import pipeline
from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator
from dualtrack_jax.data import transforms
from launch import bench_inference
from launch import experiment as experiment_lib
from launch import optim
from launch import sharding
from launch import trainer

_BENCH = flags.DEFINE_enum('bench', None, ['simulator', 'pipeline', 'train', 'inference'],
                           'What to measure.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:arg] for --bench=train.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed repetitions (steps, sweeps or batches).')
_MODEL = flags.DEFINE_enum('model', None, sorted(bench_inference.MODELS),
                           '--bench=inference: the model.')
_FRAMES = flags.DEFINE_list('frames', ['64'], '--bench=inference: input sizes (frames per sweep).')
_DTYPE = flags.DEFINE_list('dtype', ['float32'], '--bench=inference: our compute dtypes '
                           '(float32, bfloat16); the original runs in float32.')
_PRESET = flags.DEFINE_string('preset', None, '--bench=inference: released configuration '
                              '(dualtrack: tus_rec_2024 (default) or tus_rec_2025).')
_TILE = flags.DEFINE_integer('tile', None, '--bench=inference: exact temporal tiling of the '
                             'local CNN in tiles of this many frames (bounds memory).')
_ORIGINAL = flags.DEFINE_string('original', None, '--bench=inference: checkout of the original '
                                'code, timed in this process on the same weights and input.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False, '--bench=inference: also time the '
                                   'original under torch.compile.')
_COMPILE_ONLY = flags.DEFINE_bool('compile_only', False, '--bench=inference: only compile ours '
                                  "and report XLA's FLOP and memory analyses.")
flags.mark_flag_as_required('bench')

# TUS-REC frames: 480x640 pixels of 0.229 x 0.221 mm.
_TUSREC_FRAMES = dict(height=480, width=640, pixel_spacing_mm=(0.229389190673828,
                                                                0.220979690551758))


def _environment() -> str:
  return (f'{platform.processor() or platform.machine()}, {jax.device_count()} x '
          f'{jax.devices()[0].device_kind}; python {platform.python_version()}, jax '
          f'{jax.__version__}, numpy {np.__version__}')


def bench_simulator(repeats: int) -> None:
  for name, overrides in (('default 96x128', {}), ('TUS-REC 480x640', _TUSREC_FRAMES)):
    config = simulator.SimulatorConfig(**overrides, num_frames=(100, 100))
    simulator.simulate_sweep(config, 0)  # Warm-up (imports, FFT plans).
    rates = []
    for seed in range(1, repeats + 1):
      start = time.perf_counter()
      simulate_frames = len(simulator.simulate_sweep(config, seed)['images'])
      rates.append(simulate_frames / (time.perf_counter() - start))
    print(f'simulator {name}: {np.median(rates):.1f} frames/s (median of {repeats} sweeps of '
          f'100 frames; min {min(rates):.1f}, max {max(rates):.1f})')


def bench_pipeline(num_batches: int) -> None:
  with tempfile.TemporaryDirectory() as root:
    csv = simulator.write_dataset(root, config=simulator.SimulatorConfig(), num_train=8,
                                  num_val=0, seed=0)
    records = registry.read_sweep_csv(csv, 'train')
    for workers in (0, 2):
      ds = pipeline.local_windows(records, window=16, crop_hw=(64, 64), batch_size=8, seed=0,
                                  augment=transforms.LOCAL_AUGMENT, num_workers=workers)
      result = pipeline.measure_throughput(ds, num_batches=num_batches)
      print(f'pipeline local_windows (K=16, crop 64x64 of 96x128, batch 8), {workers} workers: '
            f'{result["elements_per_s"]:.1f} windows/s over {num_batches} batches')


def bench_train(config, steps: int) -> None:
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    experiment = experiment_lib.load_experiment(config)
    it = iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1))
    local = next(it)
    it.close()
    batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
    tx, schedule = optim.make_optimizer(config.optim, total_steps=10**6, warmup_steps=0)
    init_fn = functools.partial(trainer.init_state, experiment, tx)
    rng = jax.random.key(0)
    state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init_fn, rng, batch))
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng, batch)
    step = jax.jit(trainer.make_train_step(experiment, tx, schedule),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get('flops')
    state, _ = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
  frames = int(np.prod(local['images'].shape[:2]))
  median, p90 = np.median(times), np.percentile(times, 90)
  print(f'train {config.experiment}: batch {tuple(local["images"].shape)} uint8, '
        f'{config.compute_dtype}, {jax.device_count()} device(s)')
  print(f'  compile {compile_s:.1f} s; step median {median * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms; '
        f'{frames / median:.1f} frames/s' +
        (f'; {flops / median / 1e9:.1f} GFLOP/s achieved' if flops else ''))


def inference_options() -> bench_inference.Options:
  """`bench_inference.Options` from the flags."""
  try:
    sizes = tuple(int(f) for f in _FRAMES.value)
  except ValueError as e:
    raise app.UsageError(f'--frames must be integers, got {_FRAMES.value}') from e
  if _TORCH_COMPILE.value and not _ORIGINAL.value:
    raise app.UsageError('--torch_compile times the original: it needs --original')
  return bench_inference.Options(
      sizes=sizes, dtypes=tuple(_DTYPE.value), steps=_STEPS.value, preset=_PRESET.value,
      tile=_TILE.value, original=_ORIGINAL.value, torch_compile=_TORCH_COMPILE.value,
      compile_only=_COMPILE_ONLY.value)


def main(argv) -> None:
  del argv
  print(_environment())
  if _BENCH.value == 'inference':
    if _MODEL.value is None:
      raise app.UsageError('--bench=inference needs --model')
    bench_inference.run(_MODEL.value, inference_options())
  elif _BENCH.value == 'simulator':
    bench_simulator(_STEPS.value)
  elif _BENCH.value == 'pipeline':
    bench_pipeline(_STEPS.value)
  else:
    if _CONFIG.value is None:
      raise app.UsageError('--bench=train needs --config')
    bench_train(_CONFIG.value, _STEPS.value)


if __name__ == '__main__':
  app.run(main)
