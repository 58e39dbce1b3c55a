"""Inference benchmarks: our jitted model vs the PyTorch original, same weights, same input.

`python -m launch.benchmark --bench=inference --model=NAME` runs `run(NAME, options)`. A model
package offers NAME in its interface's `INFERENCE_BENCHMARKS` (launch/models.py): a function
`cases(options) -> Iterable[Mapping]` yielding one case per input size, a mapping of `Case`'s
fields whose `variants` are mappings of `Variant`'s fields: our jittable function per dtype and,
when `options.original` is given, the original PyTorch module with its inputs (weights converted
from ours).

What is timed: one call of the model on inputs already in model form (float arrays on the
device; decoding, cropping and resizing excluded), until its outputs are ready. Each side gets
one untimed warm-up call, then `steps` timed calls. Reported per side:
  compile   JAX: AOT `lower().compile()`; torch.compile: the first call (which compiles); eager: -
  median, p90 of the warm call times; items/s = items per call / median
  peak RSS  the process's resident-set high-water mark during the timed calls (VmHWM of
            /proc/self/status, reset with /proc/self/clear_refs after returning freed heap to the
            OS; ru_maxrss where that is unavailable, which cannot be reset), and its increase over
            the RSS before them (the side's working memory). Compilation (XLA, torch.compile) is
            measured the same way on its own ("compile RSS increase").
  device    on accelerators, `memory_stats()['peak_bytes_in_use']`
  XLA temp  `compiled.memory_analysis()`: XLA's buffer assignment for one call (temporaries; with
            arguments and outputs, `xla_peak`: what the device must hold for the call)
  FLOP      JAX: `compiled.cost_analysis()['flops']` (every HLO op; for a model with loops, that
            of its `Variant.flops_fn`); torch: FlopCounterMode on the warm-up call (matmuls and
            convolutions only). FLOP/s = FLOP / median.
"""
from collections.abc import Callable, Iterator, Mapping, Sequence
import ctypes
import dataclasses
import resource
import sys
import time
from typing import Any

import jax
import numpy as np

from launch import models
from ultrasound_common import errors

DTYPES = ('float32', 'bfloat16')  # What --dtype may name; every model package takes both.


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure (the flags of `--bench=inference`).

  Attributes:
    sizes: input sizes, one case each (frames per sweep for DualTrack).
    dtypes: our computation dtypes ('float32', 'bfloat16'); the original runs in float32.
    steps: timed calls per side.
    preset: the model's released configuration (model-specific names).
    tile: exact temporal tiling of long inputs (frames per tile); None: one pass.
    original: a checkout of the original code to compare with; None: ours only.
    torch_compile: also time the original under `torch.compile`.
    compile_only: compile and report XLA's cost and memory analyses without running.
    seed: weights and inputs.
    model_options: 'KEY=VALUE' switches of the model package (the same function computed
      another way, e.g. 'attention_implementation=xla'; the package checks them).
  """
  sizes: Sequence[int] = (64,)
  dtypes: Sequence[str] = ('float32',)
  steps: int = 5
  preset: str | None = None
  tile: int | None = None
  original: str | None = None
  torch_compile: bool = False
  compile_only: bool = False
  seed: int = 0
  model_options: Sequence[str] = ()

  def __post_init__(self):
    unknown = sorted(set(self.dtypes) - set(DTYPES))
    if unknown:
      raise errors.InputError(f'--dtype: unknown {unknown}; known: {list(DTYPES)}')


@dataclasses.dataclass(frozen=True)
class Variant:
  """Our model in one dtype: `fn(variables, *inputs)` is jitted by the benchmark.

  `flops_fn`, if given, is a loop-free function computing the same result, whose XLA cost
  analysis gives the FLOP count: XLA counts the body of a loop (e.g. the `lax.map` over tiles)
  once, not once per iteration.
  """
  dtype: str
  fn: Callable[..., Any]
  variables: Any
  flops_fn: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
  """One input size: our variants, their inputs and optionally the original's.

  Attributes:
    label: e.g. 'dualtrack tus_rec_2024, 64 frames (local 256x256, global 224x224)'.
    items: items (frames, images) per call, for the throughput.
    item_name: their name ('frames').
    inputs: our inputs (NumPy, float32).
    variants: our model per dtype.
    torch_module: the original (eval mode, our weights) or None.
    torch_inputs: its positional inputs (torch tensors).
    to_numpy: maps the original's output to the layout of ours (for the agreement check).
  """
  label: str
  items: int
  item_name: str
  inputs: tuple[np.ndarray, ...]
  variants: tuple[Variant, ...]
  torch_module: Any = None
  torch_inputs: tuple[Any, ...] = ()
  to_numpy: Callable[[Any], np.ndarray] | None = None


@dataclasses.dataclass
class Measurement:
  """One side of a case. Times in seconds, memory in bytes, None where not measured."""
  side: str
  compile_s: float | None = None
  median_s: float | None = None
  p90_s: float | None = None
  items_per_s: float | None = None
  peak_rss: int | None = None
  rss_increase: int | None = None
  compile_rss_increase: int | None = None
  device_peak: int | None = None
  xla_temp: int | None = None
  xla_peak: int | None = None  # Arguments + outputs + temporaries (- aliased) of the call.
  flops: float | None = None
  flops_per_s: float | None = None
  rel_diff: float | None = None  # ||ours - original|| / ||original|| (vs the original eager).
  output: np.ndarray | None = dataclasses.field(default=None, repr=False)


def _status_kib(field: str) -> int | None:
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  """Current resident set size (Linux), or None."""
  kib = _status_kib('VmRSS')
  return None if kib is None else kib * 1024


def reset_peak_rss() -> None:
  """Returns freed heap to the OS, then resets the RSS high-water mark where Linux allows it.

  Without the trim, memory that one side freed stays resident and the next side reuses it
  without raising the high-water mark, which would under-report the second side.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5')
  except OSError:
    pass


def peak_rss_bytes() -> int:
  """Resident-set high-water mark since the last `reset_peak_rss` (else since process start)."""
  kib = _status_kib('VmHWM')
  if kib is None:  # Not Linux: ru_maxrss is KiB on Linux, bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == 'darwin' else maxrss * 1024
  return kib * 1024


class PeakRss:
  """Context: the RSS high-water mark inside it (`peak`) and its rise over the RSS at entry."""

  def __enter__(self):
    reset_peak_rss()
    self.before = rss_bytes()
    return self

  def __exit__(self, *exc_info):
    self.peak = peak_rss_bytes()
    self.increase = None if self.before is None else self.peak - self.before


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
  """||ours - reference||_2 / ||reference||_2 in float64."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise errors.InputError(
        f'relative_difference: shapes differ, {ours.shape} vs {reference.shape}')
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def _timed(call: Callable[[], Any], steps: int) -> tuple[list[float], Any]:
  times, out = [], None
  for _ in range(steps):
    start = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - start)
  return times, out


def _fill_times(m: Measurement, times: list[float], items: int) -> None:
  m.median_s, m.p90_s = float(np.median(times)), float(np.percentile(times, 90))
  m.items_per_s = items / m.median_s
  if m.flops:
    m.flops_per_s = m.flops / m.median_s


def measure_jax(case: Case, variant: Variant, options: Options) -> Measurement:
  """Compiles (AOT) and times our model in one dtype on the case's inputs."""
  m = Measurement(side=f'jax {variant.dtype}')
  variables = jax.device_put(variant.variables)
  inputs = jax.device_put(case.inputs)
  jax.block_until_ready((variables, inputs))
  with PeakRss() as peak:
    start = time.perf_counter()
    compiled = jax.jit(variant.fn).lower(variables, *inputs).compile()
    m.compile_s = time.perf_counter() - start
  m.compile_rss_increase = peak.increase
  costs = (jax.jit(variant.flops_fn).lower(variables, *inputs).cost_analysis()
           if variant.flops_fn else compiled.cost_analysis())
  m.flops = (costs or {}).get('flops') or None
  analysis = compiled.memory_analysis()
  m.xla_temp = getattr(analysis, 'temp_size_in_bytes', None)
  if m.xla_temp is not None:
    m.xla_peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
                  m.xla_temp - analysis.alias_size_in_bytes)
  if not options.compile_only:
    jax.block_until_ready(compiled(variables, *inputs))  # Warm-up.
    with PeakRss() as peak:
      times, out = _timed(lambda: jax.block_until_ready(compiled(variables, *inputs)),
                          options.steps)
    m.peak_rss, m.rss_increase = peak.peak, peak.increase
    m.output = np.asarray(jax.device_get(out), np.float32)
    _fill_times(m, times, case.items)
  device = jax.devices()[0]
  if device.platform != 'cpu':
    m.device_peak = (device.memory_stats() or {}).get('peak_bytes_in_use')
  return m


def measure_torch(case: Case, options: Options, compiled: bool,
                  dtype: str = 'float32') -> Measurement:
  """Times the original (eager or `torch.compile`) on the case's torch inputs.

  On a CUDA device when torch sees one (module and inputs moved there, every timed call
  synchronised), else on the CPU. 'bfloat16' runs the float32 module under `torch.autocast`, the
  original's mixed precision; the float32 side is what ours is compared with.
  """
  import torch  # Only with --original: the project itself never needs torch.
  from torch.utils import flop_counter

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  name = 'torch.compile' if compiled else 'torch eager'
  m = Measurement(side=f'{name} {dtype}' if dtype != 'float32' else name)
  module = case.torch_module.to(device)
  inputs = tuple(x.to(device) for x in case.torch_inputs)
  if compiled:
    module = torch.compile(module)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def call():
    out = module(*inputs)
    if device == 'cuda':
      torch.cuda.synchronize()
    return out

  with torch.inference_mode(), autocast:
    if compiled:
      with PeakRss() as peak:
        start = time.perf_counter()
        call()  # Compiles.
        m.compile_s = time.perf_counter() - start
      m.compile_rss_increase = peak.increase
    else:
      counter = flop_counter.FlopCounterMode(display=False)
      with counter:
        call()  # Warm-up, counted.
      m.flops = float(counter.get_total_flops()) or None
    if device == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
      times, out = _timed(call, options.steps)
  m.peak_rss, m.rss_increase = peak.peak, peak.increase
  if device == 'cuda':
    m.device_peak = torch.cuda.max_memory_allocated()
  m.output = case.to_numpy(torch.utils._pytree.tree_map(  # pylint: disable=protected-access
      lambda t: t.float().cpu() if isinstance(t, torch.Tensor) else t, out))
  _fill_times(m, times, case.items)
  return m


def measure_case(case: Case, options: Options) -> list[Measurement]:
  """Every side of one case; with the original, each of ours gets its relative difference."""
  results = [measure_jax(case, variant, options) for variant in case.variants]
  if case.torch_module is not None and not options.compile_only:
    reference = measure_torch(case, options, compiled=False)
    sides = [reference]
    if options.torch_compile:
      sides.append(measure_torch(case, options, compiled=True))
    for m in results + sides[1:]:
      m.rel_diff = relative_difference(m.output, reference.output)
    results += sides
  return results


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value / scale, fmt)


def format_table(case: Case, results: Sequence[Measurement]) -> str:
  """A Markdown table of one case, then the original's time over ours per side (>1: ours faster)."""
  header = (f'| side | compile s | median s | p90 s | {case.item_name}/s | peak RSS GiB | '
            'RSS increase GiB | XLA temp GiB | GFLOP | GFLOP/s | rel. diff |')
  lines = [case.label, header, '|---' * 11 + '|']
  for m in results:
    lines.append(
        f'| {m.side} | {_num(m.compile_s, ".1f")} | {_num(m.median_s, ".3f")} | '
        f'{_num(m.p90_s, ".3f")} | {_num(m.items_per_s, ".2f")} | '
        f'{_num(m.peak_rss, ".2f", 2**30)} | {_num(m.rss_increase, ".2f", 2**30)} | '
        f'{_num(m.xla_temp, ".2f", 2**30)} | {_num(m.flops, ".1f", 1e9)} | '
        f'{_num(m.flops_per_s, ".1f", 1e9)} | {_num(m.rel_diff, ".2e")} |')
    if m.compile_rss_increase is not None:
      lines.append(f'  {m.side}: compile RSS increase {m.compile_rss_increase / 2**30:.2f} GiB')
    if m.device_peak is not None:
      lines.append(f'  {m.side}: device peak {m.device_peak / 2**30:.2f} GiB')
  torch_sides = [m for m in results if m.side.startswith('torch') and m.median_s]
  for ours in (m for m in results if m.side.startswith('jax') and m.median_s):
    for theirs in torch_sides:
      memory = ('' if not (ours.rss_increase and theirs.rss_increase) else
                f', RSS increase {theirs.rss_increase / ours.rss_increase:.2f}x')
      lines.append(f'  {theirs.side} / {ours.side}: time '
                   f'{theirs.median_s / ours.median_s:.2f}x{memory}')
  return '\n'.join(lines)


def as_case(case: Mapping[str, Any], source: str) -> Case:
  """A package's case mapping as a `Case` (its variants as `Variant`s); TypeError names `source`."""
  try:
    variants = tuple(Variant(**v) for v in case['variants'])
    return Case(**{**case, 'variants': variants})
  except (KeyError, TypeError) as e:
    raise TypeError(f'{source}: a case must be a mapping of the fields of '
                    f'launch.bench_inference.Case with variants of Variant\'s ({e})') from e


def cases(name: str, options: Options) -> Iterator[Case]:
  """The cases of the inference benchmark `name` of a registered model package."""
  package, make_cases = models.lookup('INFERENCE_BENCHMARKS', name, '--model')
  for case in make_cases(options):
    yield as_case(case, f'{package.__name__} INFERENCE_BENCHMARKS[{name!r}]')


def run(name: str, options: Options) -> list[tuple[Case, list[Measurement]]]:
  """Measures every case of a registered model and prints each table as it completes."""
  done = []
  for case in cases(name, options):
    results = measure_case(case, options)
    print(format_table(case, results), flush=True)
    done.append((case, results))
  return done
