"""Records parity goldens of the DualTrack paper's baselines from the original PyTorch code.

    python scripts/record_baseline_goldens.py --original=/path/to/DualTrack \
        [--out=tests/fixtures/baselines] [--only=prevost_convnet,lstm] [--commit=SHA]

`--original` is a checkout of github.com/ImFusionGmbH/DualTrack; its modules are imported from
there, never copied. The baseline scripts import their whole training stack at module level
(timm, h5py, pandas, the logger), so a model class defined inside a script is taken out of the
script's syntax tree and executed alone. Needs torch, einops and torchvision (its pure-Python
"shim" suffices: docs/dualtrack.md, section "Reference environment"), and timm for the 2-frame
CNN's backbones (`resnet10t`, `efficientnet_b1`; recorded with timm 1.0.31).

Same format and weight recipe as scripts/record_dualtrack_goldens.py (tests/dualtrack_goldens.py):
weights regenerated from a seed, inputs from seeds, only the outputs stored; float32, eval mode.
"""
import argparse
import ast
import importlib.util
import os
import platform
import sys
import types
import typing

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
from record_dualtrack_goldens import Block, record, _commit  # noqa: E402


def _definitions(original: str, script: str, names: tuple[str, ...], namespace: dict) -> dict:
  """Executes the classes and functions `names` of the original's `script` alone in `namespace`."""
  path = os.path.join(original, script)
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  nodes = [n for n in tree.body
           if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
  missing = set(names) - {n.name for n in nodes}
  if missing:
    raise SystemExit(f'{path}: no definition of {sorted(missing)}')
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, 'exec'), namespace)  # noqa: S102
  return namespace


def _video_resnet_module(original: str, torch):
  """`src.models.video_resnet` with only what the causal networks (MoNet, Ning et al.) need.

  The real module imports timm and, through `src.models.utils`, the whole data stack (h5py,
  matplotlib, ...); the network itself needs torchvision's video ResNet and `CausalConv3d`.
  """
  from torchvision.models.video import resnet as tv_resnet
  namespace = {'torch': torch, 'nn': torch.nn, 'Optional': typing.Optional,
               'BasicBlock': tv_resnet.BasicBlock, 'VideoResNet': tv_resnet.VideoResNet,
               'Conv3DNoTemporal': tv_resnet.Conv3DNoTemporal}
  _definitions(original, 'src/models/causal_conv.py', ('CausalConv3d',), namespace)
  _definitions(original, 'src/models/video_resnet.py',
               ('CausalR2Plus1dStem', 'CausalConv3DNoDownsampleTemporal', 'VideoResnetFeaturesOnly',
                'causal_video_rn18_2_frames', 'causal_video_rn18_small_temporal_context'),
               namespace)
  module = types.ModuleType('src.models.video_resnet')
  module.__dict__.update(namespace)
  return module


def _blocks(original: str, torch) -> dict[str, Block]:
  namespace = {'torch': torch, 'nn': torch.nn}

  def prevost():
    convnet = _definitions(original, 'scripts/baselines/train_2_frame_cnn.py',
                           ('Prevost2018ConvNet',), namespace)['Prevost2018ConvNet']
    # `create_model(--model prevostnet)`: no norm, torch's default initialisation, 128 px input.
    model = convnet(in_channels=2, custom_init=False)
    return model, lambda x: {'poses': model(x['pairs'])}

  def timm_backbone(model_flag):
    def build():
      # The script's own `create_model(args)` (timm.models.create_model(..., in_chans=2,
      # num_classes=6, drop_rate=args.dropout), no pretrained weights) with the README's flags.
      import timm
      create_model = _definitions(original, 'scripts/baselines/train_2_frame_cnn.py',
                                  ('create_model',), {**namespace, 'timm': timm})['create_model']
      model = create_model(types.SimpleNamespace(model=model_flag, optical_flow=False,
                                                 dropout=0.25))
      return model, lambda x: {'poses': model(x['pairs'])}
    return build

  def lstm():
    model = torch.nn.LSTM(12, 8, num_layers=2, batch_first=True)
    return model, lambda x: {'hidden': model(x['sequence'])[0]}

  def monet():
    # ResnetLSTM imports causal_video_rn18_2_frames in its __init__.
    sys.modules['src.models.video_resnet'] = _video_resnet_module(original, torch)
    import einops
    resnet_lstm = _definitions(original, 'scripts/baselines/run_monet_baseline.py',
                               ('ResnetLSTM',), {**namespace, 'einops': einops})['ResnetLSTM']
    model = resnet_lstm()
    return model, lambda x: {'poses': model(x['frames'])}

  def dclnet():
    # The module imports only torch; loaded from its file so that `src/__init__` (dotenv) and the
    # package's other modules stay out.
    spec = importlib.util.spec_from_file_location(
        'guo_et_al_resnext', os.path.join(original, 'src/models/guo_et_al_resnext.py'))
    resnext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resnext)
    model = resnext.GuoEtAlTrackingEstimator()
    return model, lambda x: {'poses': model(x['clips'])}

  def hybrid_transformer():
    # `get_model(args)` of the script with --hidden_size=128: NingEtAlModel(512, 128, backbone=
    # vidrn18_small_window_trck_reg_causal(features_only=True)); both classes built from source.
    video_resnet = _video_resnet_module(original, torch)
    import einops
    estimator = _definitions(original, 'src/models/local_encoder.py',
                             ('VideoResnetTrackingEstimator',),
                             {**namespace, 'einops': einops,
                              'LocalEncoderTrackingEstimator': type('Mixin', (), {})})[
                                  'VideoResnetTrackingEstimator']
    ning = _definitions(original, 'scripts/baselines/run_ning_et_al_reprod.py',
                        ('NingEtAlModel',), dict(namespace))['NingEtAlModel']
    backbone = estimator(video_resnet.causal_video_rn18_small_temporal_context(),
                         features_only=True)
    model = ning(512, hidden_size=128, backbone=backbone)
    return model, lambda x: {'poses': model(images=x['frames'])}

  return {
      'prevost_convnet': Block(
          '2-frame CNN of Prevost et al. 2018 on a stacked frame pair (128 x 128)',
          'train_2_frame_cnn.Prevost2018ConvNet(in_channels=2, custom_init=False)', prevost, 401,
          random_inputs={'pairs': ((3, 2, 128, 128), 'uniform', 402)}),
      'resnet10t': Block(
          '2-frame CNN backbone: timm resnet10t, 2 input channels, 6 outputs (odd sizes: the '
          'ceil-mode average pool of the shortcuts)',
          "train_2_frame_cnn.create_model(--model resnet10): timm.models.create_model('resnet10t', "
          'in_chans=2, num_classes=6, drop_rate=0.25)', timm_backbone('resnet10'), 451,
          random_inputs={'pairs': ((2, 2, 40, 48), 'uniform', 452)}),
      'efficientnet_b1': Block(
          '2-frame CNN backbone of the README command: timm efficientnet_b1, 2 input channels, '
          '6 outputs',
          "train_2_frame_cnn.create_model(--model efficientnet_b1): timm.models.create_model("
          "'efficientnet_b1', in_chans=2, num_classes=6, drop_rate=0.25)",
          timm_backbone('efficientnet_b1'), 461,
          random_inputs={'pairs': ((2, 2, 40, 40), 'uniform', 462)}),
      'lstm': Block(
          'torch.nn.LSTM, 2 layers, 12 -> 8, batch_first', 'torch.nn.LSTM(12, 8, num_layers=2, '
          'batch_first=True)', lstm, 411,
          random_inputs={'sequence': ((2, 5, 12), 'normal', 412)}),
      'monet': Block(
          'MoNet image-only: causal 2-frame video ResNet-18, 4-layer LSTM 512 -> 256, fc',
          'run_monet_baseline.ResnetLSTM()', monet, 421,
          random_inputs={'frames': ((1, 5, 1, 64, 64), 'uniform', 422)}),
      'hybrid_transformer': Block(
          'Hybrid transformer of Ning et al. 2022: causal small-window video ResNet-18, '
          '12-layer BERT (hidden 128, 8 heads), 1024 learned positions',
          'run_ning_et_al_reprod.NingEtAlModel(512, hidden_size=128, backbone='
          'vidrn18_small_window_trck_reg_causal(features_only=True))', hybrid_transformer, 441,
          random_inputs={'frames': ((1, 6, 1, 32, 32), 'uniform', 442)}),
      'dclnet': Block(
          'DCLNet: 3D ResNeXt-50 (cardinality 32), 1-channel stem, attention gate; 5-frame clips',
          'guo_et_al_resnext.GuoEtAlTrackingEstimator()', dclnet, 431,
          random_inputs={'clips': ((2, 1, 5, 32, 32), 'uniform', 432)}),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--original', required=True, help='checkout of ImFusionGmbH/DualTrack')
  parser.add_argument('--out', default=os.path.join(REPO, 'tests', 'fixtures', 'baselines'))
  parser.add_argument('--only', default='', help='comma-separated block names (default: all)')
  parser.add_argument('--commit', default=None, help='upstream commit if --original has no .git')
  parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
  args = parser.parse_args()

  original = os.path.abspath(args.original)
  if not os.path.isdir(os.path.join(original, 'scripts', 'baselines')):
    raise SystemExit(f'--original={original}: no scripts/baselines/ there (not a DualTrack '
                     'checkout)')
  sys.path.insert(0, original)
  import torch
  torch.set_num_threads(args.threads)

  blocks = _blocks(original, torch)
  names = [n for n in args.only.split(',') if n] or list(blocks)
  unknown = sorted(set(names) - set(blocks))
  if unknown:
    raise SystemExit(f'--only: unknown blocks {unknown}; known: {sorted(blocks)}')
  versions = {'python': platform.python_version(), 'torch': torch.__version__,
              'numpy': np.__version__}
  if importlib.util.find_spec('timm'):
    import timm
    versions['timm'] = timm.__version__
  common_meta = {'upstream': 'https://github.com/ImFusionGmbH/DualTrack',
                 'upstream_commit': _commit(original, args.commit),
                 'versions': versions,
                 'recorded_with': 'scripts/record_baseline_goldens.py'}
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    record(name, blocks[name], args.out, common_meta, torch)


if __name__ == '__main__':
  main()
