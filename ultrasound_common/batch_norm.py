"""Batch normalisation with PyTorch's running statistics, for the models ported from PyTorch.

torch's `BatchNorm1d/2d/3d` in training normalises a batch with its biased variance (squared
deviations over n, n = the values reduced per channel: batch x spatial) but folds the unbiased
variance (over n - 1) into `running_var`. Flax's `nn.BatchNorm` folds in the biased one, so its
running variances end up near (n - 1) / n of torch's, and evaluation (which normalises with them)
drifts from the original's by about 1 / (2n) relative: for the small n of late low-resolution
layers, not negligible. `BatchNorm` below is `nn.BatchNorm` (channels last, Flax's momentum
convention, float32 statistics, one-pass variance) with torch's running-variance update.

Both the variables and their names are Flax's (`params`: `scale`, `bias`; `batch_stats`: `mean`,
`var`, each of shape (C,)), so checkpoints and converters written for `nn.BatchNorm` read it. Under
`jax.jit` with a batch sharded over devices, the means are over the global batch (XLA all-reduces
them) and n counts the global batch too: synchronised batch norm, as one device would compute it.
"""
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """Normalises over every axis but the last; training updates torch's running statistics.

  Training (`use_running_average=False`): y = (x - mean) / sqrt(var + epsilon) * scale + bias with
  the batch's mean and biased variance; outside `init`, running mean <- momentum * mean_running +
  (1 - momentum) * mean and running var <- momentum * var_running + (1 - momentum) * var * n /
  (n - 1). Evaluation: the same normalisation with the running statistics, which are not changed.

  Attributes:
    use_running_average: normalise with the running statistics; may be given per call instead.
    momentum: weight of the old running statistic, Flax's convention: 0.9 is torch's momentum=0.1.
    epsilon: added to the variance (torch's eps).
    dtype: output dtype (default: from the input and parameters); statistics are at least float32.
    param_dtype: dtype of `scale` and `bias`.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # As nn.BatchNorm: statistics in at least float32, variance in one pass (E[x^2] - E[x]^2,
      # clipped at 0 against round-off), so training outputs are those of nn.BatchNorm.
      dtype = x.dtype if self.dtype is None else self.dtype
      stats = x.astype(jnp.promote_types(dtype, jnp.float32))
      mean = stats.mean(axes)
      var = jnp.maximum(0.0, lax.square(stats).mean(axes) - lax.square(mean))
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        if n < 2:
          # torch refuses too: "Expected more than 1 value per channel when training".
          raise ValueError(f'BatchNorm: training needs more than 1 value per channel, got input '
                           f'shape {x.shape}')
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * (var * (n / (n - 1)))
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    # nn.BatchNorm's order of operations, so its outputs are reproduced bit for bit.
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype)
