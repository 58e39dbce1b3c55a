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

For inference, `fold` folds each BatchNorm's running statistics and affine parameters into the
convolution before it, which the models then run with `fold_batch_norm=True`: that BatchNorm
(`folded=True`) only adds its folded `bias`, and the batch statistics are gone.
"""
from collections.abc import Mapping
import math
import re
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ultrasound_common import errors


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
    folded: inference with variables from `fold`: the only variable is `bias`, which is added.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    if self.folded:
      if not use_running_average:
        raise errors.InputError('BatchNorm: fold_batch_norm is for inference; train without it')
      bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
      return jnp.asarray(x + bias, jnp.result_type(x, bias) if self.dtype is None else self.dtype)
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


def _previous(name: str) -> str | None:
  """The name of a torch Sequential's previous child: '1' -> '0', 'deconv_layers_4' -> '..._3'."""
  match = re.fullmatch(r'(.*?)(\d+)', name)
  return None if not match or match.group(2) == '0' else (
      f'{match.group(1)}{int(match.group(2)) - 1}')


def fold(variables: Mapping[str, Any], *, out_axis: int = -1,
         epsilon: float = 1e-5) -> dict[str, Any]:
  """The variables of the same model with `fold_batch_norm=True`: BatchNorm folded into convs.

  Every BatchNorm (a `batch_stats` node with `mean` and `var`) must follow a bias-free convolution
  that is its previous sibling in torch's Sequential numbering (child '1' after '0', '4' after '3',
  'deconv_layers_4' after 'deconv_layers_3'). With s = scale / sqrt(var + epsilon), the kernel's
  output channels are multiplied by s and the BatchNorm keeps only bias - mean s: in eval mode,
  conv(x) then BatchNorm equals conv'(x) + bias'. Computed in float32, stored in the parameters'
  dtypes.

  Args:
    variables: {'params', 'batch_stats', ...} of a model.
    out_axis: the kernels' output-channel axis (-1 for Conv kernels (..., I, O); -2 for the
      (kh, kw, O, I) kernels of ConvTranspose with transpose_kernel=True).
    epsilon: the BatchNorms' epsilon.

  Returns:
    New variables without 'batch_stats'; the input is not changed.
  """
  def copy(tree):
    return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

  params = copy(variables['params'])

  def walk(stats: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for name, node in stats.items():
      if not (isinstance(node, Mapping) and set(node) == {'mean', 'var'}):
        walk(node, path + (name,))
        continue
      parent = params
      for key in path:
        parent = parent[key]
      conv = _previous(name)
      where = '/'.join(path + (name,))
      if conv not in parent or set(parent[conv]) != {'kernel'}:
        raise errors.InputError(
            f'batch_norm.fold: BatchNorm {where} has no bias-free convolution before it (its '
            "previous sibling in torch's Sequential numbering, e.g. '0' before '1')")
      bn, kernel = parent[name], parent[conv]['kernel']
      s = (jnp.asarray(bn['scale'], jnp.float32)
           * lax.rsqrt(jnp.asarray(node['var'], jnp.float32) + epsilon))
      shape = [1] * kernel.ndim
      shape[out_axis] = s.shape[0]
      parent[conv] = {'kernel': (kernel * s.reshape(shape)).astype(kernel.dtype)}
      parent[name] = {'bias': (bn['bias'] - node['mean'] * s).astype(bn['bias'].dtype)}

  walk(variables['batch_stats'], ())
  return {'params': params, **{k: v for k, v in variables.items()
                               if k not in ('params', 'batch_stats')}}
