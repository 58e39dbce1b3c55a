"""Whole-sweep inference of the baselines for `launch.benchmark --bench=inference`.

`--model=baseline_two_frame | baseline_monet | baseline_dclnet | baseline_hybrid`
(interface.INFERENCE_BENCHMARKS): one case per sweep length (--sizes, frames), the model of the
baseline's config (--preset 'full', the default, or 'sim') with seeded random weights, timed on one
sweep in model form: the N - 1 stacked pairs of the 2-frame CNN in one batch, MoNet's and the
hybrid transformer's (1, N) frames (end to end: CNN and transformer), DCLNet's N sliding 5-frame
clips. No comparison with the original (--original is refused).
"""
from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax.experiments import baseline_two_frame
from dualtrack_jax.experiments import common
from dualtrack_jax.models import baselines
from ultrasound_common import errors

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'dualtrack')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class _Baseline:
  config: str  # File under configs/dualtrack/.
  model: Callable[..., Any]  # Module class, built from config.model.
  inputs: Callable[[np.random.Generator, int, tuple[int, int], Any], np.ndarray]
  items: Callable[[int], int]  # Items (pairs, frames, clips) per call.
  item_name: str


_BASELINES = {
    'baseline_two_frame': _Baseline(
        'baseline_two_frame.py', baseline_two_frame.network,
        lambda rng, n, hw, config: rng.random((n - 1, *hw, 2), np.float32),
        lambda n: n - 1, 'pairs'),
    'baseline_monet': _Baseline(
        'baseline_monet.py', lambda m, dtype: baselines.MoNet(**common.module_kwargs(m),
                                                              dtype=dtype),
        lambda rng, n, hw, config: rng.random((1, n, *hw), np.float32), lambda n: n, 'frames'),
    'baseline_dclnet': _Baseline(
        'baseline_dclnet.py', lambda m, dtype: baselines.DCLNet(**common.module_kwargs(m),
                                                                dtype=dtype),
        lambda rng, n, hw, config: rng.random((n, config.data.window, *hw), np.float32),
        lambda n: n, 'clips'),
    'baseline_hybrid': _Baseline(
        'baseline_hybrid.py', lambda m, dtype: baselines.HybridTransformer(
            **common.module_kwargs(m), dtype=dtype),
        lambda rng, n, hw, config: rng.random((1, n, *hw), np.float32), lambda n: n, 'frames'),
}


def random_variables(model, example: np.ndarray, seed: int) -> Any:
  """Seeded float32 weights from the model's shapes (as `benchmarks.random_variables`)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = str(getattr(path[-1], 'key', path[-1])), leaf.shape
    if name == 'var':
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name == 'kernel' or name.startswith('weight_'):
      std = 1.0 / np.sqrt(np.prod(shape[:-1]) if name == 'kernel' else shape[-1])
    else:  # bias, mean, scale
      std = 0.1
    return (std * rng.standard_normal(shape) + (name == 'scale')).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x):
  return model.apply(variables, x)


def _config(file: str, variant: str):
  """configs/dualtrack/<file>'s get_config(variant) (model packages do not import launch)."""
  spec = importlib.util.spec_from_file_location('baseline_config', os.path.join(_CONFIGS, file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def cases(name: str, options, *, overrides: Mapping[str, Any] | None = None,
          crop: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
  """The cases of baseline `name`; `overrides` (config.model keys) and `crop` shrink it (tests)."""
  if options.original:
    raise errors.InputError(f'--model={name}: no comparison with the original (--original) for '
                            'the baselines')
  if options.tile:
    raise errors.InputError(f'--model={name}: --tile is not supported for the baselines')
  variant = options.preset or 'full'
  if variant not in ('full', 'sim'):
    raise errors.InputError(f"--preset={variant!r}: the baselines' presets are full and sim")
  baseline = _BASELINES[name]
  config = _config(baseline.config, variant)
  config.model.update(dict(overrides or {}))
  hw = tuple(crop or config.data.crop)
  rng = np.random.default_rng(options.seed)
  models = {d: baseline.model(config.model, _DTYPES[d]) for d in options.dtypes}
  reference = baseline.model(config.model, jnp.float32)
  variables = random_variables(reference, baseline.inputs(rng, 3, hw, config), options.seed)
  for num_frames in options.sizes:
    x = baseline.inputs(rng, num_frames, hw, config)
    yield dict(label=f'{name} ({variant}), {num_frames} frames of {hw[0]}x{hw[1]}',
               items=baseline.items(num_frames), item_name=baseline.item_name, inputs=(x,),
               variants=tuple(dict(dtype=d, fn=functools.partial(_apply, models[d]),
                                   variables=variables) for d in options.dtypes))


INFERENCE_BENCHMARKS = {name: functools.partial(cases, name) for name in _BASELINES}
