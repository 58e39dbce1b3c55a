"""Tests of dualtrack_jax.tiling with a cheap temporal CNN of known receptive field.

The real video ResNet is checked against whole-sweep inference in test_resnet3d.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtrack_jax import tiling

RADIUS = 4  # Layers of the toy CNN below, each with a 3-tap temporal kernel.
TILE = 5
LENGTH = TILE + 2 * RADIUS  # Window length with halo = RADIUS.
_WEIGHTS = jax.random.normal(jax.random.key(0), (RADIUS, 3, 3, 3))  # layer, tap, c_in, c_out


def temporal_cnn(x, shapes_seen=None):
  """(B, T, 3) -> (B, T, 3): RADIUS zero-padded 3-tap convs with ReLU, like a video CNN in time."""
  if shapes_seen is not None:
    shapes_seen.add(x.shape)
  for w in _WEIGHTS:
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    x = jax.nn.relu(xp[:, :-2] @ w[0] + xp[:, 1:-1] @ w[1] + xp[:, 2:] @ w[2]) + 0.1 * x
  return x


def _sweep(num_frames):
  return jax.random.normal(jax.random.key(num_frames), (2, num_frames, 3))


@pytest.mark.parametrize('num_frames', [7, LENGTH, LENGTH + 1, 27, 61])
def test_tiled_equals_whole_sweep(num_frames):
  x = _sweep(num_frames)
  shapes = set()
  tiled = tiling.tiled_temporal_apply(lambda w: temporal_cnn(w, shapes), x, tile=TILE,
                                      halo=RADIUS)
  np.testing.assert_allclose(tiled, temporal_cnn(x), atol=1e-5, rtol=1e-5)
  # One fixed window shape; short sweeps run whole.
  assert shapes == {(2, min(num_frames, LENGTH), 3)}


def test_tiled_under_jit_with_time_on_axis_0_and_new_output_axes():
  x = jnp.moveaxis(_sweep(40), 1, 0)  # (N, B, C)

  def fn(w):  # (L, B, C) -> (L, B, C, 2)
    y = jnp.moveaxis(temporal_cnn(jnp.moveaxis(w, 0, 1)), 1, 0)
    return jnp.stack([y, -y], axis=-1)

  tiled = jax.jit(lambda v: tiling.tiled_temporal_apply(fn, v, tile=TILE, halo=RADIUS, axis=0))
  np.testing.assert_allclose(tiled(x), fn(x), atol=1e-5, rtol=1e-5)


def test_tiled_with_too_small_halo_differs():
  # Shows the equality above depends on halo >= receptive radius.
  x = _sweep(40)
  tiled = tiling.tiled_temporal_apply(temporal_cnn, x, tile=TILE, halo=RADIUS - 1)
  assert np.abs(np.asarray(tiled - temporal_cnn(x))).max() > 1e-3


def test_window_plan_hand_computed():
  # N = 150, L = 64 + 2 * 17 = 98: windows [0, 98) and [52, 150); window 0 gives frames 0..80
  # (81 = 98 - 17 is the first frame within 17 of its artificial right edge).
  starts, window_of_frame = tiling.window_plan(150, tile=64, halo=17)
  np.testing.assert_array_equal(starts, [0, 52])
  np.testing.assert_array_equal(window_of_frame, [0] * 81 + [1] * 69)
  starts, _ = tiling.window_plan(61, tile=TILE, halo=RADIUS)
  np.testing.assert_array_equal(starts, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 48])


def test_tiled_rejects_bad_arguments():
  with pytest.raises(ValueError, match='tile >= 1'):
    tiling.tiled_temporal_apply(temporal_cnn, _sweep(20), tile=0, halo=2)


@pytest.mark.parametrize('num_frames, max_len, sizes', [
    (1500, 1024, [750, 750]),
    (2049, 1024, [683, 683, 683]),
    (2048, 1024, [683, 683, 682]),
    (1025, 1024, [513, 512]),
    (1024, 1024, [1024]),  # no chunking unless N > max_len
    (100, 1024, [100]),
    (10, 3, [3, 3, 3, 1]),
    (6, 2, [2, 2, 2]),  # torch.chunk(x, 4) of 6 frames gives 3 chunks
])
def test_chunk_sizes_match_torch_chunk(num_frames, max_len, sizes):
  assert tiling.chunk_sizes(num_frames, max_len) == sizes


def test_chunked_runs_each_chunk_independently():
  x = _sweep(27)  # max_len 10 -> torch.chunk(x, 3) -> [9, 9, 9]
  chunked = tiling.chunked_temporal_apply(temporal_cnn, x, max_len=10)
  expected = jnp.concatenate([temporal_cnn(x[:, a:a + 9]) for a in (0, 9, 18)], axis=1)
  np.testing.assert_allclose(chunked, expected, atol=1e-6)
  # Inexact by design: frames near the internal borders differ from the whole-sweep output.
  err = np.abs(np.asarray(chunked - temporal_cnn(x))).max(axis=(0, 2))
  assert err[8] > 1e-3 and err[9] > 1e-3
  # Interior frames agree up to float32 rounding, which differs between input lengths.
  np.testing.assert_allclose(err[:9 - RADIUS], 0, atol=1e-4)
