"""DualTrack's cases of `launch.benchmark --suite=gpu` (launch/bench_suite.py).

Inference (the issue's target: a whole 600-frame sweep under 100 ms in bfloat16 on an H200, about
80 ms on an H100, and 1.5x the original PyTorch model, eager and compiled, on the same GPU): the
released 2024 model on 600 frames (model inputs: 256x256 local crops, 224x224 global frames) in
bfloat16 and float32 against the original (`--originals=DualTrack=PATH`, a checkout of
github.com/ImFusionGmbH/DualTrack) in float32 and bfloat16 autocast, eager, and `torch.compile` in
bfloat16; the 2025 finetune in bfloat16 against the original eager; the 2024 model in bfloat16
with each computation switch that is not the default (cuDNN's fused attention, the native 3D
convolution, BatchNorm folded), to choose the defaults from. Training: a local stage-1 step on the
original network (16-frame windows of 256x256 crops from simulated 480x640 sweeps, batch 8,
bfloat16) against the original's step on the same batch (`torch_steps.py`, bfloat16 autocast).

'tiny' runs the same code paths with a reduced model on 4 frames of 32x32 (the dry run); the
original cannot build the reduced model, so its sides are skipped there.
"""
import functools
import os

from dualtrack_jax import benchmarks

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'dualtrack')
_TINY_MODEL = dict(max_positions=8, grid_spacing=2, hidden=16, fusion_layers=1, fusion_heads=2,
                   local_cnn_widths=(4, 4, 8, 8), local_cnn_stem_width=4,
                   local_cnn_temporal_kernels=(1, 1, 1, 1), vit_feature_map_size=2,
                   vit_patch_size=1, vit_layers=1, vit_heads=2, vit_intermediate=8,
                   local_hidden=8, temporal_layers=1, temporal_heads=2, temporal_intermediate=8,
                   global_cnn_widths=(4, 4, 8, 8), global_cnn_stem_width=4, global_layers=1,
                   global_heads=2)
_TINY_GEOMETRY = benchmarks.Geometry(local_hw=(32, 32), global_hw=(32, 32))
_TINY_TRAIN = {'data.synthetic.simulator.height': 96, 'data.synthetic.simulator.width': 128,
               'data.synthetic.simulator.num_frames': (20, 20), 'data.crop': (32, 32),
               'batch_size': 2, 'model.widths': (4, 4, 8, 8), 'model.stem_width': 4}


def _sweep(preset: str, dtypes: tuple[str, ...], compile_dtypes: tuple[str, ...], *,
           tiny: bool) -> dict:
  cases = benchmarks.cases
  if tiny:
    cases = functools.partial(cases, geometry=_TINY_GEOMETRY, overrides=_TINY_MODEL)
  return dict(
      name=f'dualtrack/inference/{preset}_600f', kind='inference', timeout_s=240, cases=cases,
      options=dict(sizes=(4 if tiny else 600,), preset=preset), jax_dtypes=dtypes,
      original='{DualTrack}', torch_needs=('transformers', 'omegaconf'),
      torch_dtypes=('float32', 'bfloat16'), torch_compile_dtypes=compile_dtypes,
      torch_skip='tiny: the original builds the released sizes only' if tiny else None)


def _switch(option: str, *, tiny: bool, needs_gpu: bool = False) -> dict:
  """The 2024 model in bfloat16 with one computation switch (docs/performance.md)."""
  case = _sweep('tus_rec_2024', ('bfloat16',), (), tiny=tiny)
  case.update(name=f'{case["name"]}/{option}', timeout_s=120, needs_gpu=needs_gpu, priority=3)
  case['options']['model_options'] = (option,)
  for key in ('original', 'torch_needs', 'torch_dtypes', 'torch_compile_dtypes', 'torch_skip'):
    case.pop(key)
  return case


def cases(scale: str) -> list[dict]:
  """The suite at 'full' or 'tiny' scale, most important first."""
  tiny = scale == 'tiny'
  return [
      _sweep('tus_rec_2024', ('bfloat16', 'float32'), ('bfloat16',), tiny=tiny),
      dict(name='dualtrack/train/local_stage1', kind='train', timeout_s=180, priority=2,
           config=os.path.join(_CONFIGS, 'local_stage1.py'),
           overrides={'data.dataset': 'synthetic', 'data.synthetic.num_train': 1,
                      'data.synthetic.num_val': 1, 'data.synthetic.simulator.height': 480,
                      'data.synthetic.simulator.width': 640,
                      'data.synthetic.simulator.num_frames': (40, 40), 'batch_size': 8,
                      'num_workers': 0, 'compute_dtype': 'bfloat16',
                      **(_TINY_TRAIN if tiny else {})},
           original='{DualTrack}', torch_needs=('einops',), torch_dtypes=('bfloat16',),
           torch_skip='tiny: the original builds the released sizes only' if tiny else None),
      # The 2025 finetune is the 2024 network with longer position tables and the original's
      # chunked CNN: bfloat16 and the original eager suffice.
      _sweep('tus_rec_2025', ('bfloat16',), (), tiny=tiny) | {'priority': 2},
      _switch('attention_implementation=cudnn', tiny=tiny, needs_gpu=True),
      _switch('conv3d_implementation=native', tiny=tiny),
      _switch('fold_batch_norm=true', tiny=tiny),
  ]
