"""Tests of dualtrack_jax.losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtrack_jax import losses


def test_pose_mse_hand_computed():
  pred = jnp.array([[[1.0, 2, 3, 4, 5, 6]], [[0.0, 0, 0, 0, 0, 0]]])  # (B=2, T=1, 6)
  target = jnp.array([[[1.0, 2, 3, 4, 5, 8]], [[1.0, 0, 0, 0, 0, 0]]])
  # Squared errors: 4 (one element) and 1 (one element) over 12 elements.
  np.testing.assert_allclose(losses.pose_mse(pred, target), 5.0 / 12.0, rtol=1e-6)


def test_pose_mse_mask_averages_valid_steps_only():
  pred = jnp.zeros((2, 3, 6))
  target = jnp.stack([jnp.full((3, 6), 1.0), jnp.full((3, 6), 3.0)])
  target = target.at[1, 2].set(jnp.nan)  # padding may hold anything
  mask = jnp.array([[True, True, False], [True, True, False]])
  # Valid: 2 steps x 6 of error 1 and 2 steps x 6 of error 9 -> (12 + 108) / 24.
  np.testing.assert_allclose(losses.pose_mse(pred, target, mask), 5.0, rtol=1e-6)
  np.testing.assert_allclose(losses.pose_mse(pred, target, mask.astype(jnp.float32)), 5.0,
                             rtol=1e-6)


def test_pose_mse_masked_gradient_is_finite_and_zero_on_padding():
  pred = jnp.ones((1, 3, 6))
  target = jnp.zeros((1, 3, 6)).at[0, 2].set(jnp.nan)
  mask = jnp.array([[1, 1, 0]])
  grad = jax.grad(losses.pose_mse)(pred, target, mask)
  np.testing.assert_allclose(grad[0, :2], np.full((2, 6), 2.0 / 12.0), rtol=1e-6)
  np.testing.assert_array_equal(grad[0, 2], np.zeros(6))


def test_pose_mse_empty_mask_gives_zero():
  pred = jnp.ones((1, 2, 6))
  assert float(losses.pose_mse(pred, pred + 1.0, jnp.zeros((1, 2), bool))) == 0.0


def test_pose_mse_component_weights():
  pred = jnp.zeros((2, 1, 6))
  target = jnp.array([[[1.0, 1, 1, 1, 1, 1]], [[2.0, 0, 0, 0, 0, 0]]])
  weights = jnp.array([0.5, 1, 2, 1, 1, 1])
  # Weighted squared errors: 0.5 + 1 + 2 + 1 + 1 + 1 and 0.5 * 4, over 12 elements.
  np.testing.assert_allclose(losses.pose_mse(pred, target, weights=weights), 8.5 / 12.0,
                             rtol=1e-6)
  mask = jnp.array([[True], [False]])
  np.testing.assert_allclose(losses.pose_mse(pred, target, mask, weights), 6.5 / 6.0, rtol=1e-6)
  np.testing.assert_allclose(losses.pose_mse(pred, target, weights=(1.0,) * 6),
                             losses.pose_mse(pred, target), rtol=1e-6)


def test_pose_mse_shape_errors():
  with pytest.raises(ValueError, match='target shape'):
    losses.pose_mse(jnp.zeros((1, 2, 6)), jnp.zeros((1, 3, 6)))
  with pytest.raises(ValueError, match='mask shape'):
    losses.pose_mse(jnp.zeros((1, 2, 6)), jnp.zeros((1, 2, 6)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match='weights shape'):
    losses.pose_mse(jnp.zeros((1, 2, 6)), jnp.zeros((1, 2, 6)), weights=jnp.ones(3))
