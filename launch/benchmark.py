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
             this process, eager and with --torch_compile, and the ratios. Needs torch
             importable only with --original.
  simulator  DualTrack: frames per second of the sweep simulator, default and TUS-REC-sized frames.
  pipeline   DualTrack: windows per second of the local-window Grain pipeline, 0 and 2 workers.

A suite (`--suite=NAME --out=DIR`) runs every case that the model packages give for NAME (e.g.
'gpu': DualTrack's and SONICHU's inference against the originals and their training steps), each
group of sides in a child process with a timeout, within --budget_s, and writes DIR/suite.json and
DIR/suite.md; --scale=tiny is its dry run on minimal sizes (launch/bench_suite.py).

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
  python -m launch.benchmark --suite=gpu --out=suite --originals=DualTrack=/path/to/DualTrack
  python -m launch.benchmark --suite=gpu --scale=tiny --steps=1 --out=/tmp/suite  # Dry run.
"""
import platform

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from launch import bench_inference
from launch import bench_suite
from launch import bench_train
from launch import metric_writer
from launch import models
from launch import xla_flags
from ultrasound_common import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the command-line flags (only when run as a program, so importing is side-free)."""
  flags.DEFINE_string('bench', None, "What to measure: 'train', 'inference' or a model package's "
                      "benchmark (e.g. 'simulator', 'pipeline').")
  flags.DEFINE_string('suite', None, "A suite of every package's cases (e.g. 'gpu'), each side "
                      'in a child process with a timeout; needs --out (launch/bench_suite.py).')
  flags.DEFINE_string('out', None, '--suite: folder for suite.json and suite.md.')
  flags.DEFINE_enum('scale', 'full', bench_suite.SCALES, "--suite: 'full' sizes, or 'tiny' (the "
                    'same code paths at minimal sizes: a dry run).')
  flags.DEFINE_float('budget_s', 480.0, '--suite: wall seconds for the whole suite; sides that '
                     'would start later are reported as skipped.')
  flags.DEFINE_multi_string('originals', [], '--suite: NAME=PATH of an original checkout that a '
                            'case names (e.g. DualTrack=/src/DualTrack).')
  flags.DEFINE_string('cases', None, '--suite: only the cases whose name matches this regex.')
  flags.DEFINE_string('case', None, '--suite (internal): run one case ...')
  flags.DEFINE_string('side', None, '--suite (internal): ... one side, in this process.')
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
                      'in this process on the same weights and input; --bench=train: the '
                      "original network's training step on the same batch.")
  flags.DEFINE_bool('torch_compile', False, '--bench=inference: also time the original under '
                    'torch.compile.')
  flags.DEFINE_bool('compile_only', False, "--bench=inference: only compile ours and report "
                    "XLA's FLOP and memory analyses.")
  flags.DEFINE_list('model_options', [], '--bench=inference: KEY=VALUE switches of the model '
                    'that compute the same function another way, e.g. '
                    'attention_implementation=xla,fold_batch_norm=true (docs/performance.md).')


def _environment() -> str:
  return (f'{platform.processor() or platform.machine()}, {jax.device_count()} x '
          f'{jax.devices()[0].device_kind}; python {platform.python_version()}, jax '
          f'{jax.__version__}, numpy {np.__version__}')


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
      compile_only=FLAGS.compile_only, model_options=tuple(FLAGS.model_options))


def main(argv) -> None:
  del argv
  xla_flags.apply_defaults()
  metric_writer.quiet_library_logs()
  if FLAGS.suite:
    if not FLAGS.out:
      raise app.UsageError('--suite needs --out')
    if FLAGS.case:
      bench_suite.run_child(FLAGS.suite, FLAGS.case, FLAGS.side, scale=FLAGS.scale,
                            steps=FLAGS.steps, originals=FLAGS.originals, out=FLAGS.out)
    else:
      bench_suite.run_suite(FLAGS.suite, FLAGS.out, scale=FLAGS.scale, steps=FLAGS.steps,
                            budget_s=FLAGS.budget_s, originals=FLAGS.originals,
                            cases_filter=FLAGS.cases)
    return
  if not FLAGS.bench:
    raise app.UsageError('give --bench (or --suite)')
  print(_environment())
  if FLAGS.bench == 'inference':
    if FLAGS.model is None:
      raise app.UsageError('--bench=inference needs --model')
    bench_inference.run(FLAGS.model, inference_options())
  elif FLAGS.bench == 'train':
    if FLAGS.config is None:
      raise app.UsageError('--bench=train needs --config')
    ours = bench_train.measure(FLAGS.config, FLAGS.steps)
    original = None
    if FLAGS.original:
      dtype = 'bfloat16' if FLAGS.config.get('compute_dtype') == 'bfloat16' else 'float32'
      original = bench_train.measure_torch(FLAGS.config, FLAGS.steps, original=FLAGS.original,
                                           dtype=dtype)
    bench_train.print_measurement(ours, original)
  else:
    _, measure = models.lookup('BENCHMARKS', FLAGS.bench, '--bench')
    measure(FLAGS.steps)


if __name__ == '__main__':
  define_flags()
  errors.run(main, 'launch.benchmark')
