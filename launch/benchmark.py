r"""Measures speed: `python -m launch.benchmark --bench=NAME [...]`; results go into BENCHMARKS.md.

Benchmarks (`train` and `inference` are the runtime's; the others are offered by model packages,
launch/models.py):
  train      training throughput of a config's experiment: compile time (AOT) separately, then the
             median and p90 step time and samples (batch rows: DualTrack windows, SONICHU
             images) per second over --steps warm steps. The same global
             batch is fed every step, so data loading is not counted.
  inference  a model's inference (--model, a name of a package's INFERENCE_BENCHMARKS; what is
             timed and how memory and FLOP are measured is in launch/bench_inference.py) for
             each of --frames and --dtype: compile time, warm latency median and p90 over
             --steps calls, frames/s, peak memory, achieved FLOP/s; with --original=PATH also
             the original PyTorch model (same weights, same input; outputs compared first) in
             this process, eager and with --torch_compile, and the ratios. Needs torch importable only with --original.
  simulator  DualTrack: frames per second of the sweep simulator, default and TUS-REC-sized frames.
  pipeline   DualTrack: windows per second of the local-window Grain pipeline, 0 and 2 workers.

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
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from launch import bench_inference
from launch import experiment as experiment_lib
from launch import metric_writer
from launch import models
from launch import optim
from launch import sharding
from launch import trainer
from launch import xla_flags
from ultrasound_common import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('bench', None, "What to measure: 'train', 'inference' or a model package's "
                      "benchmark (e.g. 'simulator', 'pipeline').", required=True)
  config_flags.DEFINE_config_file('config', None, 'Config file[:arg] for --bench=train.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed repetitions (steps, sweeps or batches).')
  flags.DEFINE_string('model', None, '--bench=inference: the model (e.g. dualtrack, sonichu).')
  flags.DEFINE_list('frames', ['64'], '--bench=inference: input sizes (frames per sweep).')
  flags.DEFINE_list('dtype', ['float32'], '--bench=inference: our compute dtypes (float32, '
                    'bfloat16); the original runs in float32.')
  flags.DEFINE_string('preset', None, '--bench=inference: released configuration (dualtrack: '
                      'tus_rec_2024 (default) or tus_rec_2025).')
  flags.DEFINE_integer('tile', None, '--bench=inference: exact temporal tiling of the local CNN '
                       'in tiles of this many frames (bounds memory).')
  flags.DEFINE_string('original', None, '--bench=inference: checkout of the original code, timed '
                      'in this process on the same weights and input.')
  flags.DEFINE_bool('torch_compile', False, '--bench=inference: also time the original under '
                    'torch.compile.')
  flags.DEFINE_bool('compile_only', False, "--bench=inference: only compile ours and report "
                    "XLA's FLOP and memory analyses.")


def _environment() -> str:
  return (f'{platform.processor() or platform.machine()}, {jax.device_count()} x '
          f'{jax.devices()[0].device_kind}; python {platform.python_version()}, jax '
          f'{jax.__version__}, numpy {np.__version__}')


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
  samples = len(next(iter(local.values())))
  median, p90 = np.median(times), np.percentile(times, 90)
  shapes = ', '.join(f'{k} {tuple(np.shape(v))} {np.asarray(v).dtype}' for k, v in local.items())
  print(f'train {config.experiment}: batch {shapes}; {config.get("compute_dtype", "float32")}, '
        f'{jax.device_count()} device(s)')
  print(f'  compile {compile_s:.1f} s; step median {median * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms; '
        f'{samples / median:.1f} samples/s' +
        (f'; {flops / median / 1e9:.1f} GFLOP/s achieved' if flops else ''))


def inference_options() -> bench_inference.Options:
  """`bench_inference.Options` from the flags."""
  try:
    sizes = tuple(int(f) for f in FLAGS.frames)
  except ValueError as e:
    raise app.UsageError(f'--frames must be integers, got {FLAGS.frames}') from e
  if FLAGS.torch_compile and not FLAGS.original:
    raise app.UsageError('--torch_compile times the original: it needs --original')
  return bench_inference.Options(
      sizes=sizes, dtypes=tuple(FLAGS.dtype), steps=FLAGS.steps, preset=FLAGS.preset,
      tile=FLAGS.tile, original=FLAGS.original, torch_compile=FLAGS.torch_compile,
      compile_only=FLAGS.compile_only)


def main(argv) -> None:
  del argv
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  print(_environment())
  if FLAGS.bench == 'inference':
    if FLAGS.model is None:
      raise app.UsageError('--bench=inference needs --model')
    bench_inference.run(FLAGS.model, inference_options())
  elif FLAGS.bench == 'train':
    if FLAGS.config is None:
      raise app.UsageError('--bench=train needs --config')
    bench_train(FLAGS.config, FLAGS.steps)
  else:
    _, measure = models.lookup('BENCHMARKS', FLAGS.bench, '--bench')
    measure(FLAGS.steps)


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.benchmark')
