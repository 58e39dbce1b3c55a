"""Tests of `launch.benchmark --suite` (launch/bench_suite.py), on the CPU at tiny sizes.

The GPU suite's dry run goes through the same child processes, cases and report as on a GPU, so
that the command prepared for a borrowed accelerator cannot rot between loans. The toy package's
suite has a case for each way a side can end (ok, failed, timeout, skipped).
"""
import json
import os
import subprocess
import sys

import pytest

from launch import bench_suite
import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')


def _suite(out: str, *flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get('PYTHONPATH', '')]))
  env['XLA_FLAGS'] = cpu_env.xla_flags(1)  # One CPU device, as on a one-GPU machine.
  return subprocess.run([sys.executable, '-m', 'launch.benchmark', f'--out={out}', *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _report(out: str) -> dict:
  with open(os.path.join(out, 'suite.json'), encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.slow
def test_gpu_suite_dry_run_reports_every_case_and_side(tmp_path):
  out = str(tmp_path / 'suite')
  result = _suite(out, '--suite=gpu', '--scale=tiny', '--steps=1')
  assert result.returncode == 0, result.stderr
  report = _report(out)
  expected = bench_suite.suite_cases('gpu', 'tiny')
  assert [c['name'] for c in report['cases']] == [c['name'] for c in expected]
  names = {c['name'] for c in expected}
  assert {'dualtrack/inference/tus_rec_2024_600f', 'dualtrack/inference/tus_rec_2025_600f',
          'dualtrack/train/local_stage1', 'sonichu/inference/batch_256',
          'sonichu/train/keypoints', 'sonichu/train/ijepa',
          'dualtrack/inference/tus_rec_2024_600f/conv3d_implementation=native',
          'sonichu/inference/batch_256/deconv_implementation=transposed'} <= names
  for case, entry in zip(expected, report['cases']):
    assert [s['side'] for s in entry['sides']] == [s.name for s in bench_suite.sides(case)]
    for side in entry['sides']:
      if case.get('needs_gpu'):  # cuDNN's attention.
        assert side['status'] == 'skipped: needs a GPU'
      elif side['side'].startswith('jax'):
        assert side['status'] == 'ok', (entry['name'], side)
        assert side['median_s'] > 0 and side['items_per_s'] > 0 and side['compile_s'] > 0
        assert side['xla_compiles'] >= 1
        if entry['kind'] == 'inference':
          assert side['xla_peak'] > 0
      else:  # CI has no torch; the tiny DualTrack cannot be built by the original.
        assert side['status'].startswith('skipped: '), (entry['name'], side)
  with open(os.path.join(out, 'suite.md'), encoding='utf-8') as f:
    table = f.read()
  assert '| case | side | status | compile s (XLA compiles) | median ms |' in table
  assert all(name in table for name in names)
  assert 'frames/s' in table and 'images/s' in table and 'samples/s' in table


def test_each_status_is_reported(tmp_path):
  out = str(tmp_path / 'suite')
  result = _suite(out, '--suite=toy', '--scale=tiny', '--steps=2')
  assert result.returncode == 0, result.stderr
  sides = {(c['name'], s['side']): s for c in _report(out)['cases'] for s in c['sides']}
  assert sides['toy/ok', 'jax float32']['status'] == 'ok'
  assert sides['toy/ok', 'jax bfloat16']['items_per_s'] > 0
  assert sides['toy/ok', 'torch eager']['status'] == (
      'skipped: no checkout of the original given (--originals=Toy=PATH)')
  assert sides['toy/ok', 'torch.compile bfloat16']['status'].startswith('skipped: ')
  assert sides['toy/fails', 'jax float32']['status'] == (
      'failed: launch.benchmark: error: toy: no such weights for batch 2')
  assert sides['toy/hangs', 'jax float32']['status'] == 'timeout after 10 s'


def test_spent_budget_skips_the_rest_and_bad_flags_are_refused(tmp_path):
  out = str(tmp_path / 'suite')
  result = _suite(out, '--suite=toy', '--scale=tiny', '--budget_s=0', '--cases=ok')
  assert result.returncode == 0, result.stderr
  (case,) = _report(out)['cases']
  assert {s['status'] for s in case['sides'] if s['side'].startswith('jax')} == {
      'skipped: suite budget spent'}
  result = _suite(out, '--suite=toy', '--originals=Toy')
  assert result.returncode == 1
  assert 'launch.benchmark: error: --originals: expected NAME=PATH, got' in result.stderr
  result = _suite(out, '--suite=nothing')
  assert "--suite='nothing': no registered model package offers it" in result.stderr
