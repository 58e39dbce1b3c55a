r"""Every figure of a benchmark suite in one command: `launch.benchmark --suite=gpu --out=DIR`.

Made for a borrowed accelerator with minutes to spare: the sides of a case run in child
processes (`launch.benchmark --suite=NAME --case=CASE --side=GROUP`), one for ours ('jax'), one for
the original eager ('torch') and one for `torch.compile`, each under a timeout, so that a hang, a
crash or an out-of-memory costs that group only, and the frameworks never share a device memory
pool. Ours and the original eager run first, case by case in the suite's order (most important
first), then the `torch.compile` groups, until `--budget_s` is spent; what is left is reported as
skipped, never silently dropped. The parent writes DIR/suite.json (device, driver, versions, every
figure and status) and DIR/suite.md.

Cases come from the model packages (launch/models.py, `BENCHMARK_SUITES`): `{suite name:
cases(scale)}`, where `scale` is 'full' (the figures we report) or 'tiny' (the same code paths on
minimal sizes: the CPU dry run of the tests), returning mappings with
  name       unique in the suite, e.g. 'dualtrack/tus_rec_2024/600f';
  priority   1 (the suite's headline figures) and up; the cases of every package run in order
             of priority, then of the packages' lists;
  kind       'inference' or 'train';
  timeout_s  per group of sides (below), at full scale; tiny_timeout_s at tiny scale (default
             `TINY_TIMEOUT_S`);
  inference: cases(options) (`launch.bench_inference`; one Case from one size), options (a
             mapping of `bench_inference.Options` fields), jax_dtypes, and optionally original
             (what `Options.original` must be for the torch sides: a path, possibly naming a
             checkout `{NAME}` given by --originals=NAME=PATH), torch_needs (modules the torch
             side imports), torch_dtypes, torch_compile_dtypes, and torch_skip (a reason not
             to run the torch sides, e.g. a reduced model that the original cannot build);
             needs_gpu: skipped (with the reason) where the first device is not a GPU, e.g. the
             'cudnn' attention;
  train:     config ('path.py[:arg]', a config file) and overrides ({dotted key: value}),
             measured by `launch.bench_train`; with original (and torch_dtypes), also the
             package's PyTorch step (TORCH_TRAIN_STEPS) on the same batch.

Sides of an inference case: 'jax <dtype>' for each of jax_dtypes, then, when torch and the
original are available (else skipped, with the reason), 'torch eager <dtype>' and 'torch.compile
<dtype>' for each of torch_compile_dtypes (bfloat16 is `torch.autocast`). Each side's outputs
are kept, and every side is compared with the torch float32 one (`rel_diff`). A train case has
the sides 'jax' and, with an original, 'torch eager [<dtype>]'.

Reported per side: status ('ok', 'timeout', 'failed: <last error line>', 'skipped: <reason>'),
compile time and the number of XLA compilations (jax.monitoring), median and p90 seconds per
call, items/s, achieved FLOP/s (XLA's cost analysis), the device peak (ours: XLA's buffer
assignment of the compiled call, arguments + outputs + temporaries, what the device must hold;
torch: `max_memory_allocated` over its timed calls on CUDA) and the process's peak RSS.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from launch import bench_inference
from launch import bench_train
from launch import config_utils
from launch import models
from ultrasound_common import errors
from ultrasound_common import files

SCALES = ('full', 'tiny')
TINY_TIMEOUT_S = 300
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# Child processes: JAX must not take 75 % of the GPU up front, or the torch sides (and the device
# peak of ours) would measure its pool rather than the model.
_CHILD_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'PYTHONUNBUFFERED': '1'}


@dataclasses.dataclass(frozen=True)
class Side:
  """One timed side of a case: our jitted model in a dtype, or the torch original."""
  name: str
  framework: str  # 'jax' or 'torch'.
  dtype: str
  compiled: bool = False  # torch.compile.

  @property
  def group(self) -> str:
    """The child process that measures it: 'jax', 'torch' (eager) or 'torch.compile'."""
    return 'torch.compile' if self.compiled else self.framework


def suite_cases(suite: str, scale: str) -> list[dict[str, Any]]:
  """Every case of `suite` over the registered packages, in their order, names checked."""
  if scale not in SCALES:
    raise errors.InputError(f'--scale={scale!r}: unknown; known: {list(SCALES)}')
  out = []
  for module in models.interfaces().values():
    make = dict(getattr(module, 'BENCHMARK_SUITES', {}) or {}).get(suite)
    if make is not None:
      out += [dict(case) for case in make(scale)]
  if not out:
    raise models.ModelPackageError(f'--suite={suite!r}: no registered model package offers it')
  out.sort(key=lambda case: case.get('priority', 1))
  names = [case['name'] for case in out]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise models.ModelPackageError(f'--suite={suite!r}: case names defined twice: {duplicates}')
  return out


def sides(case: Mapping[str, Any]) -> list[Side]:
  """The sides of a case, ours first."""
  if case['kind'] == 'train':
    out = [Side('jax', 'jax', 'float32')]
  else:
    out = [Side(f'jax {d}', 'jax', d) for d in case.get('jax_dtypes', ('float32',))]
  for dtype in case.get('torch_dtypes', ('float32',)) if case.get('original') else ():
    out.append(Side('torch eager' + ('' if dtype == 'float32' else f' {dtype}'), 'torch', dtype))
  if case.get('original'):
    for dtype in case.get('torch_compile_dtypes', ()):
      out.append(Side('torch.compile' + ('' if dtype == 'float32' else f' {dtype}'), 'torch',
                      dtype, compiled=True))
  return out


def torch_unavailable(case: Mapping[str, Any], originals: Mapping[str, str]) -> str | None:
  """Why the torch sides of `case` cannot run here (None: they can)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if case.get('torch_skip'):
    return case['torch_skip']
  missing = [n for n in re.findall(r'\{(\w+)\}', case['original']) if n not in originals]
  if missing:
    return f'no checkout of the original given (--originals={missing[0]}=PATH)'
  for module in ('torch', *case.get('torch_needs', ())):
    if importlib.util.find_spec(module) is None:
      return f'{module} is not importable'
  return None


def _resolve_original(case: Mapping[str, Any], originals: Mapping[str, str]) -> str:
  return re.sub(r'\{(\w+)\}', lambda m: originals[m.group(1)], case['original'])


class _CompileCounter:
  """Counts XLA backend compilations and their seconds (a jax.monitoring listener)."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _COMPILE_EVENT:
      self.count += 1
      self.seconds += duration

  def take(self) -> dict[str, Any]:
    """The compilations since the last call."""
    taken = {'xla_compiles': self.count, 'xla_compile_s': self.seconds}
    self.count, self.seconds = 0, 0.0
    return taken


def _record(m: bench_inference.Measurement, case: bench_inference.Case) -> dict[str, Any]:
  record = dataclasses.asdict(m)
  record.pop('output')
  return {**record, 'label': case.label, 'items': case.items, 'item_name': case.item_name}


def run_group(case: Mapping[str, Any], group: str, *, steps: int, originals: Mapping[str, str],
              out_dir: str) -> list[dict[str, Any]]:
  """Measures the sides of one group ('jax', 'torch', 'torch.compile') of a case here.

  Each side's outputs go to out_dir/<side>.npy for the parent's comparison.
  """
  counter = _CompileCounter()
  chosen = [side for side in sides(case) if side.group == group]
  if case['kind'] == 'train':
    config = config_utils.load_config_file(case['config'])
    config.update_from_flattened_dict(dict(case.get('overrides', {})))
    if group == 'jax':
      return [{**bench_train.measure(config, steps), **counter.take()}]
    return [bench_train.measure_torch(config, steps, original=_resolve_original(case, originals),
                                      dtype=side.dtype) for side in chosen]
  options = bench_inference.Options(
      **{**case['options'], 'steps': steps, 'dtypes': tuple(s.dtype for s in chosen),
         'original': _resolve_original(case, originals) if group != 'jax' else None})
  (one,) = [bench_inference.as_case(c, case['name']) for c in case['cases'](options)]
  counter.take()  # Building the case (weights, the original) is not the sides' compilation.
  records = []
  for side in chosen:
    if group == 'jax':
      (variant,) = [v for v in one.variants if v.dtype == side.dtype]
      m = bench_inference.measure_jax(one, variant, options)
    else:
      m = bench_inference.measure_torch(one, options, side.compiled, side.dtype)
    m.side = side.name
    np.save(os.path.join(out_dir, _file_name(side.name) + '.npy'), m.output)
    records.append({**_record(m, one), **counter.take()})
  return records


def _file_name(side: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', side)


def _environment() -> dict[str, Any]:
  env = {'python': platform.python_version(), 'jax': jax.__version__, 'numpy': np.__version__,
         'platform': platform.platform(), 'processor': platform.processor() or platform.machine(),
         'devices': [f'{d.platform}: {d.device_kind}' for d in jax.devices()],
         'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None}
  for package in ('jaxlib', 'flax', 'torch', 'timm', 'transformers'):
    try:
      env[package] = __import__(package).__version__
    except ImportError:
      pass
  if shutil.which('nvidia-smi'):
    query = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                            '--format=csv,noheader'], capture_output=True, text=True, check=False)
    env['nvidia_smi'] = query.stdout.strip() or query.stderr.strip()
  return env


def _last_error(stderr: str) -> str:
  lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
  return lines[-1][:300] if lines else 'no output'


def run_suite(suite: str, out: str, *, scale: str = 'full', steps: int = 10,
              budget_s: float = 480.0, originals: Sequence[str] = (),
              cases_filter: str | None = None) -> dict[str, Any]:
  """Runs every group of every case in child processes; writes out/suite.json and suite.md."""
  named = parse_originals(originals)
  cases = [c for c in suite_cases(suite, scale)
           if cases_filter is None or re.search(cases_filter, c['name'])]
  if not cases:
    raise errors.InputError(f'--cases={cases_filter!r} matches no case of --suite={suite}')
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  report = {'suite': suite, 'scale': scale, 'steps': steps, 'budget_s': budget_s,
            'environment': _environment(), 'cases': []}
  work = tempfile.mkdtemp(dir=out)
  entries = {case['name']: {} for case in cases}
  # Pass 1: ours and the original eager, case by case; pass 2: torch.compile, whose compilation
  # is the slowest and the least needed part.
  for groups in (('jax', 'torch'), ('torch.compile',)):
    for case in cases:
      no_torch = torch_unavailable(case, named) if case.get('original') else None
      timeout = (case['timeout_s'] if scale == 'full' else
                 case.get('tiny_timeout_s', TINY_TIMEOUT_S))
      case_dir = os.path.join(work, _file_name(case['name']))
      os.makedirs(case_dir, exist_ok=True)
      for group in groups:
        names = [side.name for side in sides(case) if side.group == group]
        if not names:
          continue
        left = budget_s - (time.perf_counter() - start)
        if case.get('needs_gpu') and jax.devices()[0].platform != 'gpu':
          status = {'status': 'skipped: needs a GPU'}
        elif group != 'jax' and no_torch:
          status = {'status': f'skipped: {no_torch}'}
        elif left <= 0:
          status = {'status': 'skipped: suite budget spent'}
        else:
          print(f'[{time.perf_counter() - start:4.0f} s] {case["name"]}: {", ".join(names)}',
                flush=True)
          status = _run_child(suite, case['name'], group, scale=scale, steps=steps,
                              originals=originals, out=case_dir, timeout=min(timeout, left))
        found = {r['side']: r for r in status.pop('records', [])}
        entries[case['name']].update({n: {'side': n, **status, **found.get(n, {})}
                                      for n in names})
  for case in cases:
    entry = {'name': case['name'], 'kind': case['kind'],
             'sides': [entries[case['name']][side.name] for side in sides(case)]}
    _compare_outputs(entry, os.path.join(work, _file_name(case['name'])))
    report['cases'].append(entry)
  shutil.rmtree(work)
  report['wall_s'] = time.perf_counter() - start
  files.write_json(os.path.join(out, 'suite.json'), report, indent=1)
  files.write_text(os.path.join(out, 'suite.md'), format_report(report))
  print(format_report(report))
  return report


def _run_child(suite, case, group, *, scale, steps, originals, out, timeout) -> dict[str, Any]:
  command = [sys.executable, '-m', 'launch.benchmark', f'--suite={suite}', f'--case={case}',
             f'--side={group}', f'--scale={scale}', f'--steps={steps}', f'--out={out}',
             *(f'--originals={o}' for o in originals)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **_CHILD_ENV}, check=False)
  except subprocess.TimeoutExpired:
    return {'status': f'timeout after {timeout:.0f} s'}
  result = os.path.join(out, group + '.json')
  if done.returncode != 0 or not os.path.exists(result):
    return {'status': f'failed: {_last_error(done.stderr)}'}
  with open(result, encoding='utf-8') as f:
    return {'status': 'ok', 'records': json.load(f)}


def _compare_outputs(entry: dict[str, Any], work: str) -> None:
  """rel_diff of every side against the torch float32 side, when both ran."""
  reference = os.path.join(work, _file_name('torch eager') + '.npy')
  if not os.path.exists(reference):
    return
  expected = np.load(reference)
  for record in entry['sides']:
    path = os.path.join(work, _file_name(record['side']) + '.npy')
    if record.get('status') == 'ok' and os.path.exists(path) and record['side'] != 'torch eager':
      record['rel_diff'] = bench_inference.relative_difference(np.load(path), expected)


def run_child(suite: str, case_name: str, group: str, *, scale: str, steps: int,
              originals: Sequence[str], out: str) -> None:
  """The child's part: one group of one case, its records written to out/<group>.json."""
  (case,) = [c for c in suite_cases(suite, scale) if c['name'] == case_name] or [None]
  if case is None:
    raise errors.InputError(f'--case={case_name!r}: not a case of --suite={suite}')
  if group not in ('jax', 'torch', 'torch.compile'):
    raise errors.InputError(f"--side={group!r}: 'jax', 'torch' or 'torch.compile'")
  records = run_group(case, group, steps=steps, originals=parse_originals(originals),
                      out_dir=out)
  files.write_json(os.path.join(out, group + '.json'), records)


def parse_originals(originals: Sequence[str]) -> dict[str, str]:
  """--originals NAME=PATH pairs as a dict; each PATH must exist."""
  out = {}
  for item in originals:
    name, sep, path = item.partition('=')
    if not sep or not name:
      raise errors.InputError(f'--originals: expected NAME=PATH, got {item!r}')
    if not os.path.isdir(path):
      raise errors.MissingFileError(f'--originals={item}: {path} is not a folder')
    out[name] = os.path.abspath(path)
  return out


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value / scale, fmt)


def format_report(report: Mapping[str, Any]) -> str:
  """The suite as Markdown: environment, then one row per side with units in the header."""
  env = report['environment']
  lines = [f'# Benchmark suite {report["suite"]} ({report["scale"]} sizes, {report["steps"]} '
           f'timed steps)', '',
           f'{", ".join(env["devices"])}; {env.get("nvidia_smi", env["processor"])}; python '
           f'{env["python"]}, jax {env["jax"]}' +
           (f', torch {env["torch"]}' if 'torch' in env else '') +
           f'; load average {env["load_average"]}; wall {report.get("wall_s", 0):.0f} s', '',
           '| case | side | status | compile s (XLA compiles) | median ms | p90 ms | items/s | '
           'TFLOP/s | device peak GiB | peak RSS GiB | rel. diff |', '|---' * 11 + '|']
  for entry in report['cases']:
    for r in entry['sides']:
      compiles = (f'{_fmt(r.get("compile_s"), ".1f")} ({r["xla_compiles"]})'
                  if 'xla_compiles' in r else _fmt(r.get('compile_s'), '.1f'))
      peak = r.get('xla_peak') or r.get('device_peak')
      items = (f'{r["items_per_s"]:.1f} {r.get("item_name", "samples")}/s'
               if r.get('items_per_s') else '-')
      lines.append(
          f'| {entry["name"]} | {r["side"]} | {r["status"]} | {compiles} | '
          f'{_fmt(r.get("median_s"), ".2f", 1e-3)} | {_fmt(r.get("p90_s"), ".2f", 1e-3)} | '
          f'{items} | {_fmt(r.get("flops_per_s"), ".3f", 1e12)} | {_fmt(peak, ".2f", 2**30)} | '
          f'{_fmt(r.get("peak_rss"), ".2f", 2**30)} | {_fmt(r.get("rel_diff"), ".1e")} |')
  return '\n'.join(lines) + '\n'
