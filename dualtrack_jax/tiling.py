"""Temporal tiling of sequence models over long sweeps (docs/dualtrack.md, section "Long sweeps").

`tiled_temporal_apply` is exact: for a function whose output frame t depends only on input frames
t - r .. t + r (a temporal CNN with zero padding at the sequence ends) and halo >= r, the tiled
result equals one call on the whole sweep, with the memory of one call on tile + 2 * halo frames.

`chunked_temporal_apply` reproduces the released 2025 model's *inexact* chunking
(`torch.chunk(x, N // max_len + 1)`, every chunk run on its own, so frames near an internal chunk
border see zero padding instead of their neighbours). It is needed for parity with that checkpoint,
which was finetuned and evaluated that way.
"""
from collections.abc import Callable
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def window_plan(num_frames: int, *, tile: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
  """Window starts and, for each frame, the window it is taken from.

  Windows have length L = tile + 2 * halo and starts k * tile clipped to N - L. Frame t is taken
  from the first window that holds it at least `halo` frames away from an artificial window edge
  (a window edge that is not a sweep end). Interior windows contribute `tile` frames each.

  Args:
    num_frames: N, with N > tile + 2 * halo (shorter sweeps need no tiling).
    tile: output frames per window, >= 1.
    halo: context frames on each side, >= 0.

  Returns:
    starts: (K,) int window starts; window_of_frame: (N,) int index into starts.
  """
  length = tile + 2 * halo
  if num_frames <= length:
    raise ValueError(f'window_plan: {num_frames} frames fit into one window of {length}')
  num_windows = math.ceil((num_frames - length) / tile) + 1
  starts = np.minimum(np.arange(num_windows) * tile, num_frames - length)
  # Last frame (exclusive) each window may give: a true sweep end is not an artificial edge.
  valid_stop = np.where(starts + length < num_frames, starts + length - halo, num_frames)
  valid_start = np.where(starts > 0, starts + halo, 0)
  frames = np.arange(num_frames)
  window_of_frame = np.searchsorted(valid_stop, frames, side='right')
  # Coverage holds by construction (valid_start[k + 1] <= valid_stop[k]); checked as a guard.
  assert np.all(valid_start[window_of_frame] <= frames), 'window plan leaves a frame uncovered'
  return starts, window_of_frame


def tiled_temporal_apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, tile: int,
                         halo: int, axis: int = 1) -> jax.Array:
  """Applies a temporal sequence function over a long sequence in fixed-length windows.

  `fn` runs on windows of fixed length L = tile + 2 * halo (one compiled shape for every window)
  whose starts are clipped into [0, N - L]; no fake frames are added, so the per-layer zero padding
  at the true sweep ends is the same as in a whole-sweep call. Each output frame is taken from a
  window in which it is at least `halo` frames from any artificial window edge; with halo at least
  the receptive-field radius of `fn` the result equals `fn(x)`. A sequence with N <= L is passed
  to `fn` in one call.

  Memory: the windows run one after the other, so peak memory is that of one `fn` call on L
  frames, plus the input and the stacked window outputs (K * L output frames, K =
  ceil((N - L) / tile) + 1 windows), independent of N for the activations inside `fn`.
  Under `jax.jit` the windows run in a `lax.map`. Called eagerly, they run in a Python loop, so a
  jitted `fn` compiles once for every sweep length (a `lax.map` would compile anew for each number
  of windows).

  Args:
    fn: maps (..., L, ...) -> (..., L, ...) with time on `axis` in input and output; the other
      output axes may differ from the input ones (e.g. features instead of pixels).
    x: input sequence with N frames on `axis`.
    tile: output frames per window, >= 1 (larger is faster, smaller needs less memory).
    halo: context frames on each side of a tile, >= 0; use the receptive-field radius of `fn`.
    axis: time axis of input and output.

  Returns:
    The output of `fn` for the whole sequence, N frames on `axis`.
  """
  if tile < 1 or halo < 0:
    raise ValueError(f'tiled_temporal_apply: need tile >= 1 and halo >= 0, got {tile}, {halo}')
  axis = axis % x.ndim
  num_frames = x.shape[axis]
  length = tile + 2 * halo
  if num_frames <= length:
    return fn(x)
  starts, window_of_frame = window_plan(num_frames, tile=tile, halo=halo)

  def run_window(start):
    return fn(lax.dynamic_slice_in_dim(x, start, length, axis=axis))

  if isinstance(x, jax.core.Tracer):
    windows = lax.map(run_window, jnp.asarray(starts, jnp.int32))  # (K, ..., L on axis + 1, ...)
  else:
    windows = jnp.stack([run_window(int(start)) for start in starts])
  windows = jnp.moveaxis(windows, axis + 1, 1)  # (K, L, ...)
  offsets = np.arange(num_frames) - starts[window_of_frame]
  return jnp.moveaxis(windows[window_of_frame, offsets], 0, axis)


def chunk_sizes(num_frames: int, max_len: int) -> list[int]:
  """Chunk lengths of the original inexact chunking of a sequence of `num_frames` frames.

  No chunking when N <= max_len; otherwise `torch.chunk(x, N // max_len + 1)`: chunks of
  ceil(N / n) frames and a shorter last one (possibly fewer than n chunks), e.g. N = 1500,
  max_len = 1024 -> [750, 750].
  """
  if max_len < 1:
    raise ValueError(f'chunk_sizes: max_len must be >= 1, got {max_len}')
  if num_frames <= max_len:
    return [num_frames]
  size = math.ceil(num_frames / (num_frames // max_len + 1))
  return [min(size, num_frames - start) for start in range(0, num_frames, size)]


def chunked_temporal_apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, max_len: int,
                           axis: int = 1) -> jax.Array:
  """Runs `fn` independently on consecutive chunks of `chunk_sizes(N, max_len)` frames.

  Reproduces `apply_model_chunked` of the released 2025 DualTrack model (inexact near chunk
  borders by design). At most two distinct chunk lengths, so at most two compiled shapes.

  Args:
    fn: maps (..., T, ...) -> (..., T, ...) with time on `axis`.
    x: input sequence with N frames on `axis`.
    max_len: the original `max_subsequence_size`.
    axis: time axis of input and output.

  Returns:
    The chunk outputs concatenated along `axis`.
  """
  axis = axis % x.ndim
  bounds = np.cumsum([0] + chunk_sizes(x.shape[axis], max_len))
  outputs = [fn(lax.slice_in_dim(x, int(a), int(b), axis=axis))
             for a, b in zip(bounds[:-1], bounds[1:])]
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=axis)
