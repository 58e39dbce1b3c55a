"""DualTrack's benchmarks (`launch.benchmark`): whole-sweep inference, the simulator, the pipeline.

`--bench=inference --model=dualtrack` runs `cases`, given `launch.bench_inference.Options` (read by
attribute: sizes, dtypes, preset, tile, original, seed); each case is a mapping of that module's
`Case` fields. `--bench=simulator` and `--bench=pipeline` run `simulator_speed` and
`pipeline_speed`.

Inference: one case per sweep length N: `DualTrack(**preset)` on a batch of one sweep, i.e. what
`launch.predict` runs per sweep after preprocessing: local frames (1, N, 256, 256) and the
global encoder's frames (1, M, 224, 224) at `regular_grid_indices(N)`, float32 in [0, 1). The
original receives all N global frames, as its `DualTrack.forward` does (it gathers the M itself),
channels-first: (1, N, 1, 256, 256) and (1, N, 1, 224, 224).

Weights are seeded noise with activation-preserving scales (not a training result: speed does
not depend on the values); with `original`, they are converted by `convert.to_torch` and loaded
strictly into the original's own builder (`get_model(config_path=configs/model/<preset>.yaml)`),
so both sides run the same weights, and every side's poses are compared with the original's.
`tile=T` runs the local 3D CNN in exact temporal tiles of T frames (`cnn_chunking=
'exact_tiling'`), which bounds its memory without changing the result. `options.model_options`
selects `SWITCHES` ('KEY=VALUE', `--model_options`): the same function computed another way
(docs/performance.md), so the original still applies; with fold_batch_norm=true ours runs on the
folded variables.
"""
from collections.abc import Iterator, Mapping
import dataclasses
import functools
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualtrack_jax import convert
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator
from dualtrack_jax.data import transforms
from dualtrack_jax.models import dualtrack
from dualtrack_jax.models import resnet3d
from ultrasound_common import attention
from ultrasound_common import errors
from ultrasound_common import switches

# --preset -> (our keyword arguments, the original's model config file).
PRESETS = {
    'tus_rec_2024': (dualtrack.TUS_REC_2024, 'configs/model/dualtrack.yaml'),
    'tus_rec_2025': (dualtrack.TUS_REC_2025, 'configs/model/dualtrack_ft_tus_rec_2025.yaml'),
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
SWITCHES = {'attention_implementation': attention.IMPLEMENTATIONS,
            'conv3d_implementation': resnet3d.CONV3D_IMPLEMENTATIONS,
            'fold_batch_norm': (False, True)}


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Frame sizes of the two encoders (the released model's by default)."""
  local_hw: tuple[int, int] = (256, 256)
  global_hw: tuple[int, int] = (224, 224)


def random_variables(model: dualtrack.DualTrack, local: np.ndarray, global_: np.ndarray,
                     seed: int) -> dict[str, Any]:
  """Seeded float32 noise in the model's tree, scaled to keep activations O(1).

  Shapes come from `jax.eval_shape` (compiling the initialisers of the full model takes long on
  CPU). Kernels N(0, 1 / fan_in); norm scales 1 + N(0, 0.1^2); biases and BN means N(0, 0.1^2);
  BN variances U(0.5, 2); embeddings and position tables N(0, 0.5^2).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), local, global_)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'var':
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name == 'kernel':
      std = 1.0 / np.sqrt(np.prod(shape[:-1]))
    elif name in ('embedding', 'cls_token', 'position_embeddings'):
      std = 0.5
    else:  # bias, mean, scale
      std = 0.1
    return (std * rng.standard_normal(shape) + (name == 'scale')).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _original_model(path: str, config_file: str, state_dict: Mapping[str, np.ndarray]):
  """The original's model built by its own registry from its config, with our weights, eval mode."""
  path = os.path.abspath(path)
  config = os.path.join(path, config_file)
  if not os.path.isfile(config):
    raise errors.InputError(
        f'--original={path}: {config_file} not found (not a DualTrack checkout)')
  if path not in sys.path:
    sys.path.insert(0, path)
  try:
    import torch  # Only with --original.
    from src.models import model_registry  # The original's package, from `path`.
  except ImportError as e:
    raise errors.MissingPackageError(
        f'--original={path}: the original model needs the package {e.name!r}, which is not '
        'installed (its environment: docs/dualtrack.md, "Reference environment")') from e

  module = model_registry.get_model(config_path=config)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return module.eval()


def cases(options, *, geometry: Geometry = Geometry(),
          overrides: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
  """The cases of `options` (one per sweep length).

  Args:
    options: sizes are sweep lengths; preset defaults to 'tus_rec_2024'.
    geometry: frame sizes (smaller ones with `overrides` give a reduced model, for tests).
    overrides: `DualTrack` attributes replacing the preset's (reduced widths); not with
      `options.original`, whose builder has the released sizes.
  """
  preset_name = options.preset or 'tus_rec_2024'
  if preset_name not in PRESETS:
    raise errors.InputError(f'--preset={preset_name!r}: unknown; known: {sorted(PRESETS)}')
  if overrides and options.original:
    raise errors.InputError(
        'dualtrack benchmark: overrides change the model; the original cannot follow')
  preset, config_file = PRESETS[preset_name]
  settings = switches.parse(options.model_options, SWITCHES)
  kwargs = {**preset, **(overrides or {}), **settings}
  whole = kwargs
  if options.tile is not None:
    whole = {**kwargs, 'cnn_chunking': None, 'max_subsequence': None}
    kwargs.update(cnn_chunking='exact_tiling', max_subsequence=options.tile)
  # FLOP are counted on the loop-free one-pass model: the useful work (tiles also recompute halos,
  # and XLA counts a loop body once).
  flops_fns = {name: functools.partial(_apply_unchunked,
                                       dualtrack.DualTrack(**whole, dtype=DTYPES[name]))
               for name in options.dtypes}
  models = {name: dualtrack.DualTrack(**kwargs, dtype=DTYPES[name]) for name in options.dtypes}
  reference = dualtrack.DualTrack(**{**kwargs, 'fold_batch_norm': False})
  rng = np.random.default_rng(options.seed)
  local_shape, global_shape = (1, 2, *geometry.local_hw), (1, 1, *geometry.global_hw)
  variables = random_variables(reference, np.zeros(local_shape, np.float32),
                               np.zeros(global_shape, np.float32), options.seed)
  ours = dualtrack.fold_batch_norm(variables) if settings.get('fold_batch_norm') else variables
  torch_module = None
  if options.original:
    torch_module = _original_model(options.original, config_file,
                                   convert.to_torch(variables, convert.DUALTRACK))
  tiling = (f', exact tiles of {options.tile} frames' if options.tile else '') + (
      switches.describe(settings))
  for num_frames in options.sizes:
    local = rng.random((1, num_frames, *geometry.local_hw), np.float32)
    global_all = rng.random((1, num_frames, *geometry.global_hw), np.float32)
    global_ = global_all[:, dualtrack.regular_grid_indices(num_frames, reference.grid_spacing)]
    torch_inputs = ()
    if torch_module is not None:
      import torch  # Only with --original.
      torch_inputs = (torch.from_numpy(global_all[:, :, None]), torch.from_numpy(local[:, :, None]))
    yield dict(
        label=(f'dualtrack {preset_name}, {num_frames} frames (local '
               f'{"x".join(map(str, geometry.local_hw))}, global '
               f'{"x".join(map(str, geometry.global_hw))}, {global_.shape[1]} global frames)'
               f'{tiling}'),
        items=num_frames, item_name='frames', inputs=(local, global_),
        variants=tuple(dict(dtype=name, fn=functools.partial(_apply, models[name]),
                            variables=ours, flops_fn=flops_fns[name])
                       for name in options.dtypes),
        torch_module=torch_module, torch_inputs=torch_inputs,
        to_numpy=lambda poses: poses.float().numpy())


def _apply(model: dualtrack.DualTrack, variables, local, global_):
  return model.apply(variables, local, global_)


def _apply_unchunked(model: dualtrack.DualTrack, variables, local, global_):
  with resnet3d.unchunked():
    return model.apply(variables, local, global_)


# TUS-REC frames: 480x640 pixels of 0.229 x 0.221 mm.
_TUSREC_FRAMES = dict(height=480, width=640, pixel_spacing_mm=(0.229389190673828,
                                                                0.220979690551758))


def simulator_speed(repeats: int) -> None:
  """Frames per second of the sweep simulator, default frames and TUS-REC-sized frames."""
  for name, overrides in (('default 96x128', {}), ('TUS-REC 480x640', _TUSREC_FRAMES)):
    config = simulator.SimulatorConfig(**overrides, num_frames=(100, 100))
    simulator.simulate_sweep(config, 0)  # Warm-up (imports, FFT plans).
    rates = []
    for seed in range(1, repeats + 1):
      start = time.perf_counter()
      simulate_frames = len(simulator.simulate_sweep(config, seed)['images'])
      rates.append(simulate_frames / (time.perf_counter() - start))
    print(f'simulator {name}: {np.median(rates):.1f} frames/s (median of {repeats} sweeps of '
          f'100 frames; min {min(rates):.1f}, max {max(rates):.1f})')


def pipeline_speed(num_batches: int) -> None:
  """Windows per second of the local-window Grain pipeline with 0 and 2 worker processes."""
  with tempfile.TemporaryDirectory() as root:
    csv = simulator.write_dataset(root, config=simulator.SimulatorConfig(), num_train=8,
                                  num_val=0, seed=0)
    records = registry.read_sweep_csv(csv, 'train')
    for workers in (0, 2):
      ds = pipeline.local_windows(records, window=16, crop_hw=(64, 64), batch_size=8, seed=0,
                                  augment=transforms.LOCAL_AUGMENT, num_workers=workers)
      result = pipeline.measure_throughput(ds, num_batches=num_batches)
      print(f'pipeline local_windows (K=16, crop 64x64 of 96x128, batch 8), {workers} workers: '
            f'{result["elements_per_s"]:.1f} windows/s over {num_batches} batches')
