"""Tests of the inference benchmark (launch/bench_inference.py, dualtrack_jax/benchmarks.py).

A reduced-width DualTrack (its local CNN has a temporal receptive radius of 1, so that a 4-frame
sweep can be tiled) runs on 4-frame sweeps of 32 x 32 pixels through the benchmark's own code
path, without the original (CI has no torch). The reports' fields are checked for presence and
consistency, and the measuring helpers against independent numbers. launch/benchmark.py itself is
not imported: its absl flags would clash with those of other entry points in one test session.
"""
import sys

import numpy as np
import pytest

from dualtrack_jax import benchmarks
from launch import bench_inference
from ultrasound_common import errors

REDUCED = dict(max_positions=8, grid_spacing=2, hidden=16, fusion_layers=1, fusion_heads=2,
               local_cnn_widths=(4, 4, 8, 8), local_cnn_stem_width=4,
               local_cnn_temporal_kernels=(1, 1, 1, 1), vit_feature_map_size=2,
               vit_patch_size=1, vit_layers=1, vit_heads=2, vit_intermediate=8, local_hidden=8,
               temporal_layers=1, temporal_heads=2, temporal_intermediate=8,
               global_cnn_widths=(4, 4, 8, 8), global_cnn_stem_width=4, global_layers=1,
               global_heads=2)
GEOMETRY = benchmarks.Geometry(local_hw=(32, 32), global_hw=(32, 32))


def _cases(options: bench_inference.Options) -> list[bench_inference.Case]:
  return [bench_inference.as_case(case, 'test') for case in
          benchmarks.cases(options, geometry=GEOMETRY, overrides=REDUCED)]


@pytest.fixture(scope='module')
def measured():
  """One 4-frame case in float32 and bfloat16, 3 timed calls each."""
  options = bench_inference.Options(sizes=(4,), dtypes=('float32', 'bfloat16'), steps=3)
  (case,) = _cases(options)
  return case, bench_inference.measure_case(case, options)


def test_case_inputs_follow_the_sweep(measured):
  case, _ = measured
  local, global_ = case.inputs
  assert case.items == 4 and case.item_name == 'frames'
  assert local.shape == (1, 4, 32, 32) and local.dtype == np.float32
  assert global_.shape == (1, 2, 32, 32)  # grid spacing 2: frames 0 and 2
  assert 0 <= local.min() and local.max() < 1
  assert [v.dtype for v in case.variants] == ['float32', 'bfloat16']
  assert case.torch_module is None


def test_report_fields_are_positive_and_consistent(measured):
  _, results = measured
  assert [m.side for m in results] == ['jax float32', 'jax bfloat16']
  for m in results:
    assert m.compile_s > 0 and 0 < m.median_s <= m.p90_s
    assert m.items_per_s == pytest.approx(4 / m.median_s)
    assert m.flops > 0 and m.flops_per_s == pytest.approx(m.flops / m.median_s)
    assert m.xla_temp > 0
    assert m.peak_rss > 0 and 0 <= m.rss_increase <= m.peak_rss
    assert m.output.shape == (1, 3, 6) and np.isfinite(m.output).all()
    assert m.rel_diff is None  # no original to compare with
  # bfloat16 computes the same poses to bfloat16 precision.
  assert bench_inference.relative_difference(results[1].output, results[0].output) < 0.1


def test_table_lists_every_side(measured):
  case, results = measured
  table = bench_inference.format_table(case, results)
  assert table.splitlines()[0] == case.label
  assert '4 frames' in case.label and '2 global frames' in case.label
  rows = [line for line in table.splitlines() if line.startswith('| jax')]
  assert len(rows) == 2 and all(len(row.split('|')) == 13 for row in rows)


@pytest.mark.slow  # ~25 s on a loaded 2-core machine (one more compile)
def test_exact_tiling_keeps_the_poses(measured):
  """Tiles of 1 frame with a halo of 1: two 3-frame windows in a lax.map, the same poses."""
  _, results = measured
  options = bench_inference.Options(sizes=(4,), steps=1, tile=1)
  (case,) = _cases(options)
  assert 'exact tiles of 1 frames' in case.label
  (tiled,) = bench_inference.measure_case(case, options)
  np.testing.assert_allclose(tiled.output, results[0].output, rtol=1e-5, atol=1e-5)
  # The FLOP count is the one-pass model's, not XLA's count of one loop iteration.
  assert tiled.flops == pytest.approx(results[0].flops, rel=0.05)


@pytest.mark.slow  # ~25 s on a loaded 2-core machine (one more compile)
def test_compile_only_reports_analyses_without_running():
  options = bench_inference.Options(sizes=(4,), steps=1, compile_only=True)
  (case,) = _cases(options)
  (m,) = bench_inference.measure_case(case, options)
  assert m.compile_s > 0 and m.flops > 0 and m.xla_temp > 0
  assert m.median_s is None and m.output is None


def test_relative_difference():
  reference = np.array([3.0, 4.0])
  assert bench_inference.relative_difference(reference + [0.0, 0.5], reference) == 0.1
  with pytest.raises(ValueError, match='shapes differ'):
    bench_inference.relative_difference(reference, reference[:1])


def test_peak_rss_sees_a_new_allocation():
  bench_inference.reset_peak_rss()
  before = bench_inference.rss_bytes()
  block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
  assert bench_inference.peak_rss_bytes() - before >= 60 * 2**20
  del block


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="--model='resnet': unknown; known: .*dualtrack, sonichu"):
    next(bench_inference.cases('resnet', bench_inference.Options()))
  with pytest.raises(ValueError, match='--preset=.*known'):
    _cases(bench_inference.Options(preset='tus_rec_2023'))
  with pytest.raises(ValueError, match='--dtype: unknown'):
    _cases(bench_inference.Options(dtypes=('float16',)))
  with pytest.raises(ValueError, match='original cannot follow'):
    _cases(bench_inference.Options(original='/nonexistent'))


def test_an_original_without_its_packages_names_the_missing_one(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'path', list(sys.path))  # _original_model prepends the folder.
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'model.yaml').write_text('model: x\n')
  (tmp_path / 'src' / 'models').mkdir(parents=True)
  (tmp_path / 'src' / '__init__.py').write_text('import no_such_package_of_the_original\n')
  (tmp_path / 'src' / 'models' / '__init__.py').write_text('')
  # Without torch installed (CI), torch is the missing package; with it, the original's own.
  with pytest.raises(errors.MissingPackageError, match=(
      r"--original=.*: the original model needs the package "
      r"'(torch|no_such_package_of_the_original)', which is not installed")):
    benchmarks._original_model(str(tmp_path), 'configs/model.yaml', {})
