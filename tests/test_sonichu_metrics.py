"""Tests for sonichu_jax.metrics: MRE means as the card and FM_UIA compute them, SDR, biometry."""
import math

import numpy as np
import pytest
from scipy import integrate

from sonichu_jax import metrics
from sonichu_jax import tasks


def _numerical_perimeter(a: float, b: float) -> float:
  value, _ = integrate.quad(lambda t: math.hypot(a * math.sin(t), b * math.cos(t)), 0.0,
                            2 * math.pi, epsabs=1e-12, epsrel=1e-13, limit=200)
  return value


@pytest.mark.parametrize('a,b', [(50.0, 50.0), (60.0, 48.0), (80.0, 40.0), (100.0, 30.0)])
def test_ramanujan_matches_numerical_integration(a, b):
  expected = _numerical_perimeter(a, b)
  assert metrics.ramanujan_perimeter(a, b) == pytest.approx(expected, rel=1e-6)
  assert metrics.ramanujan_perimeter(b, a) == pytest.approx(expected, rel=1e-6)


def test_head_circumference_from_rotated_axis_points():
  a, b, angle, centre = 70.0, 52.0, math.radians(27.0), np.array([200.0, 150.0])
  u = np.array([math.cos(angle), math.sin(angle)])
  n = np.array([-u[1], u[0]])
  points = np.array([centre - a * u, centre + a * u, centre - b * n, centre + b * n])
  values = metrics.measure('HC', points)
  assert values['OFD'] == pytest.approx(2 * a)
  assert values['BPD'] == pytest.approx(2 * b)
  assert values['HC'] == pytest.approx(_numerical_perimeter(a, b), rel=1e-6)
  # FA uses the same ellipse: its AC from TAD (0, 1) and APAD (2, 3).
  assert metrics.measure('FA', points)['AC'] == pytest.approx(values['HC'])


def test_angle_of_progression_on_a_known_geometry():
  inferior = np.array([100.0, 80.0])
  cranial = inferior + 40.0 * np.array([-1.0, 0.0])  # symphysis axis to the left
  for aop in (95.0, 120.0, 150.0, 179.5):
    # Image y points down: the tangent turns by `aop` degrees from the symphysis ray.
    direction = np.array([math.cos(math.radians(180.0 - aop)), math.sin(math.radians(180.0 - aop))])
    tangent = inferior + 30.0 * direction
    points = np.array([cranial, inferior, tangent, [0.0, 0.0]])  # keypoint 3 plays no part
    assert metrics.measure('AOP', points)['AoP'] == pytest.approx(aop, abs=1e-9)
  # Batched keypoints give batched values.
  batch = np.stack([points, points[:, ::-1]])
  assert metrics.measure('AOP', batch)['AoP'].shape == (2,)


def test_pair_lengths_in_measurement_order():
  k = tasks.get_task('A4C').num_keypoints
  points = np.zeros((k, 2))
  points[1::2, 0] = np.arange(1, k // 2 + 1)  # pair j has length j + 1
  values = metrics.measure('A4C', points)
  assert list(values) == list(metrics.MEASUREMENT_NAMES['A4C'])
  assert [float(v) for v in values.values()] == list(range(1, k // 2 + 1))
  assert len(metrics.measure('PLAX', np.zeros((22, 2)))) == 11
  assert metrics.measure('fetal_femur', [[0.0, 0.0], [30.0, 40.0]])['FL'] == 50.0


def test_measurement_names_cover_every_task():
  for task in tasks.TASKS:
    names = metrics.MEASUREMENT_NAMES[task.name]
    values = metrics.measure(task.name, np.random.default_rng(0).random((task.num_keypoints, 2)))
    assert list(values) == list(names)


def test_weighted_and_unweighted_means_on_a_hand_example():
  # HC: two samples with MRE 1 and 3 (one keypoint error each of 3-4-5 style); AOP: one with 10.
  target_hc = np.zeros((2, 4, 2))
  pred_hc = target_hc.copy()
  pred_hc[0, :, 0] = 1.0  # every keypoint 1 px off: MRE 1
  pred_hc[1, :, :] = [3.0 * 3 / 5, 3.0 * 4 / 5]  # every keypoint 3 px off: MRE 3
  target_aop = np.zeros((1, 4, 2))
  pred_aop = target_aop.copy()
  pred_aop[0, :2] = [6.0, 8.0]  # two keypoints 10 px off, two exact: MRE 5
  per_sample = {'HC': metrics.sample_mre(pred_hc, target_hc),
                'AOP': metrics.sample_mre(pred_aop, target_aop)}
  np.testing.assert_allclose(per_sample['HC'], [1.0, 3.0])
  np.testing.assert_allclose(per_sample['AOP'], [5.0])
  out = metrics.mre_summary(per_sample)
  assert out['mre/HC'] == pytest.approx(2.0)
  assert out['mre/AOP'] == pytest.approx(5.0)
  assert out['mre/weighted'] == pytest.approx((1.0 + 3.0 + 5.0) / 3)  # pooled over samples
  assert out['mre/unweighted'] == pytest.approx((2.0 + 5.0) / 2)  # mean over tasks
  assert out['count/HC'] == 2 and out['count/total'] == 3


def test_unweighted_mean_of_the_cards_task_numbers_is_its_18_07():
  card = {'AOP': 4.8, 'FUGC': 3.9, 'FA': 7.6, 'HC': 8.0, 'IVC': 29.0, 'PLAX': 15.7, 'PSAX': 22.8,
          'A4C': 63.7, 'fetal_femur': 7.1}
  out = metrics.mre_summary({name: np.array([value]) for name, value in card.items()})
  assert round(out['mre/unweighted'], 2) == 18.07


def test_missing_points_scored_as_origin_or_masked():
  target = np.array([[[10.0, 0.0], [0.0, 0.0]]])  # the second point missing: (0, 0) as FM_UIA
  pred = np.array([[[10.0, 0.0], [3.0, 4.0]]])
  assert metrics.sample_mre(pred, target)[0] == pytest.approx(2.5)  # FM_UIA: distance to (0, 0)
  assert metrics.sample_mre(pred, target, [[True, False]])[0] == 0.0
  assert np.isnan(metrics.sample_mre(pred, target, [[False, False]])[0])
  # A sample with no visible keypoint is left out of the means.
  out = metrics.mre_summary({'FUGC': np.array([np.nan, 4.0])})
  assert out['mre/FUGC'] == 4.0 and out['count/FUGC'] == 1


def test_success_rates_are_inclusive_fractions():
  rates = metrics.success_rates([1.0, 5.0, 6.0, 20.0, 25.0, np.nan], radii=(5, 10, 20))
  assert rates == {5.0: 0.4, 10.0: 0.6, 20.0: 0.8}


def test_evaluate_reports_every_metric():
  target = {'fetal_femur': np.array([[[0.0, 0.0], [30.0, 40.0]], [[10.0, 10.0], [10.0, 70.0]]]),
            'FUGC': np.array([[[5.0, 5.0], [5.0, 45.0]]])}
  scale = np.array([[[1.0, 1.0], [1.2, 1.2]], [[1.0, 1.0], [1.0, 1.0]]])
  pred = {'fetal_femur': target['fetal_femur'] * scale,
          'FUGC': target['FUGC'] + [[[0.0, 30.0], [0.0, 0.0]]]}
  out = metrics.evaluate(pred, target, radii=(5, 20))
  # Femur sample 0: FL 50 -> 60 (distal end 10 px off); sample 1 exact.
  assert out['mre/fetal_femur'] == pytest.approx((5.0 + 0.0) / 2)
  assert out['biometry/fetal_femur/FL_mae'] == pytest.approx(5.0)
  assert out['biometry/fetal_femur/FL_mape'] == pytest.approx(10.0)
  assert out['mre/FUGC'] == pytest.approx(15.0)
  assert out['biometry/FUGC/CL_mae'] == pytest.approx(30.0)
  assert out['mre/weighted'] == pytest.approx((5.0 + 0.0 + 15.0) / 3)
  assert out['mre/unweighted'] == pytest.approx((2.5 + 15.0) / 2)
  assert out['sdr@5px/fetal_femur'] == 0.75 and out['sdr@20px/FUGC'] == 0.5
  assert out['sdr@5px/all'] == pytest.approx(4 / 6)
  # With a mask: the invisible point is out of MRE, SDR and the biometry.
  visible = {'fetal_femur': np.array([[True, False], [True, True]]),
             'FUGC': np.array([[True, True]])}
  masked = metrics.evaluate(pred, target, visible, radii=(5,))
  assert masked['mre/fetal_femur'] == 0.0
  assert masked['biometry/fetal_femur/FL_mae'] == 0.0
  assert masked['sdr@5px/fetal_femur'] == 1.0


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='Unknown SONICHU task'):
    metrics.measure('XYZ', np.zeros((2, 2)))
  with pytest.raises(ValueError, match='3 keypoints, the task has 2'):
    metrics.measure('IVC', np.zeros((3, 2)))
  with pytest.raises(ValueError, match='differ in shape'):
    metrics.radial_errors(np.zeros((2, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match='differ from target tasks'):
    metrics.evaluate({'HC': np.zeros((1, 4, 2))}, {'FA': np.zeros((1, 4, 2))})
