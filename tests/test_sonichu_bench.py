"""Tests of SONICHU's inference benchmark cases (sonichu_jax/benchmarks.py), without torch.

A reduced SONICHU (2-block ViT of width 32, heads of 16 filters) at the real 256x256 input runs
through the benchmark's own code path; its output must be the model's keypoints for the case's
images, bfloat16 must stay close to float32, and bad options are refused with their flag named.
"""
import numpy as np
import pytest

from launch import bench_inference
from sonichu_jax import benchmarks

REDUCED = dict(embed_dim=32, depth=2, num_heads=2, head_filters=16)


@pytest.fixture(scope='module')
def measured():
  options = bench_inference.Options(sizes=(2,), dtypes=('float32', 'bfloat16'), steps=2)
  (case,) = [bench_inference.as_case(c, 'test') for c in benchmarks.cases(options,
                                                                           overrides=REDUCED)]
  return case, bench_inference.measure_case(case, options)


def test_case_runs_the_model_on_a_batch_of_images(measured):
  case, results = measured
  (images,) = case.inputs
  assert images.shape == (2, 256, 256, 3) and case.items == 2 and case.item_name == 'images'
  f32, bf16 = results
  assert f32.side == 'jax float32' and bf16.side == 'jax bfloat16'
  model = benchmarks.sonichu.SonichuModel(**REDUCED, tasks=(benchmarks.TASK,))
  want = model.apply(case.variants[0].variables, images, benchmarks.TASK)
  np.testing.assert_allclose(f32.output, np.asarray(want), atol=1e-6)
  assert f32.output.shape == (2, 4, 2)
  # Seeded noise weights give keypoints away from the centre (else the comparison is empty).
  assert np.abs(f32.output - 0.5).max() > 1e-3
  assert bench_inference.relative_difference(bf16.output, f32.output) < 0.05
  for m in results:
    assert m.compile_s > 0 and 0 < m.median_s <= m.p90_s and m.flops > 0
    assert m.items_per_s == pytest.approx(2 / m.median_s)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match='--original=.*use --original=timm'):
    next(benchmarks.cases(bench_inference.Options(original='/src/sonichu')))
  with pytest.raises(ValueError, match='--preset'):
    next(benchmarks.cases(bench_inference.Options(preset='vitpose')))
  with pytest.raises(ValueError, match='--dtype'):
    next(benchmarks.cases(bench_inference.Options(dtypes=('float16',))))
  with pytest.raises(ValueError, match='--tile'):
    next(benchmarks.cases(bench_inference.Options(tile=4)))
