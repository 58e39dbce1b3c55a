"""SONICHU's cases of `launch.benchmark --suite=gpu` (launch/bench_suite.py).

Inference (the issue's target: at least 8,000 images/s at 256x256 in bfloat16 on an H200, and
1.3x PyTorch eager and compiled on the same weights): batches of 256 and 1024 images in bfloat16
(whether throughput still grows past 256), batch 256 also in float32 and against the same network
in timm/torch (eager float32 and bfloat16 autocast, `torch.compile` bfloat16), and batch 256 with
each computation switch that is not the default (cuDNN's and XLA's fused attention, the
transposed-convolution head), to choose the defaults from. Training: a keypoint
step (batch 64, bfloat16; against the same step of the timm network, `torch_steps.py`, under
bfloat16 autocast) and an I-JEPA pretraining step (batch 128, bfloat16), ViT-B/16 at 256x256 on
synthetic images.

'tiny' runs the same code paths with a 2-block ViT of width 32 and batches of 2 (the dry run).
"""
import functools
import os

from sonichu_jax import benchmarks

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'sonichu')
_TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2, head_filters=16)
_TINY_TRAIN = {'data.synthetic.num_train': 4, 'data.synthetic.num_val': 2, 'batch_size': 2,
               'num_workers': 0, 'model.embed_dim': 32, 'model.depth': 2, 'model.num_heads': 2}


def _inference(batch, dtypes, *, tiny, timeout_s, torch=False):
  case = dict(
      name=f'sonichu/inference/batch_{batch}', kind='inference', timeout_s=timeout_s,
      cases=functools.partial(benchmarks.cases, overrides=_TINY_MODEL if tiny else None),
      options=dict(sizes=(2 if tiny else batch,)), jax_dtypes=dtypes)
  if torch:
    case.update(original=benchmarks.ORIGINAL, torch_needs=('timm',),
                torch_dtypes=('float32', 'bfloat16'), torch_compile_dtypes=('bfloat16',))
  return case


def _switch(batch, option: str, *, tiny: bool, needs_gpu: bool = False) -> dict:
  """Ours in bfloat16 with one computation switch (docs/performance.md) against the default."""
  case = _inference(batch, ('bfloat16',), tiny=tiny, timeout_s=90)
  case['name'] += '/' + option
  case['options']['model_options'] = (option,)
  case.update(needs_gpu=needs_gpu, priority=3)
  return case


def cases(scale: str) -> list[dict]:
  """The suite at 'full' or 'tiny' scale, most important first."""
  tiny = scale == 'tiny'
  synthetic = {'data.dataset': 'synthetic', 'data.synthetic.num_train': 8,
               'data.synthetic.num_val': 2, 'num_workers': 0, 'compute_dtype': 'bfloat16'}
  return [
      _inference(256, ('bfloat16', 'float32'), tiny=tiny, timeout_s=240, torch=True),
      _inference(1024, ('bfloat16',), tiny=tiny, timeout_s=120) | {'priority': 2},
      _switch(256, 'attention_implementation=cudnn', tiny=tiny, needs_gpu=True),
      _switch(256, 'attention_implementation=xla', tiny=tiny),
      _switch(256, 'deconv_implementation=transposed', tiny=tiny),
      dict(name='sonichu/train/keypoints', kind='train', timeout_s=180, priority=2,
           config=os.path.join(_CONFIGS, 'keypoints.py'),
           overrides={**synthetic, 'batch_size': 64, 'eval_tta': False,
                      **(_TINY_TRAIN | {'model.head_filters': 16} if tiny else {})},
           original=benchmarks.ORIGINAL, torch_needs=('timm',), torch_dtypes=('bfloat16',)),
      dict(name='sonichu/train/ijepa', kind='train', timeout_s=180, priority=2,
           config=os.path.join(_CONFIGS, 'pretrain_ijepa.py'),
           overrides={**synthetic, 'batch_size': 128,
                      **(_TINY_TRAIN | {'predictor.dim': 16, 'predictor.depth': 1,
                                        'predictor.num_heads': 2} if tiny else {})}),
  ]
