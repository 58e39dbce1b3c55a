"""The DualTrack paper's baselines: parity with the original modules, sweep inference, configs.

Parity: each architecture's state dict in the original layout is regenerated from its golden
(tests/fixtures/baselines/, recorded by scripts/record_baseline_goldens.py from upstream commit
27cc3f3), converted with the baseline's table and run in float32; max |ours - original| /
max |original| must stay within 1e-5. No torch needed.
"""
import os

import h5py
import jax
import numpy as np
import pytest
from scipy import ndimage

import dualtrack_goldens
from dualtrack_jax import baseline_benchmarks
from dualtrack_jax import convert
from dualtrack_jax import feature_cache
from dualtrack_jax import interface
from dualtrack_jax import pose
from dualtrack_jax.data import pipeline
from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator
from dualtrack_jax.data import sweeps
from dualtrack_jax.experiments import baseline_dclnet
from dualtrack_jax.experiments import baseline_hybrid
from dualtrack_jax.experiments import baseline_monet
from dualtrack_jax.experiments import baseline_two_frame
from dualtrack_jax.experiments import baselines
from dualtrack_jax.experiments import common
from dualtrack_jax.experiments import local_stage1
from dualtrack_jax.data import transforms
from dualtrack_jax.models import baselines as models
from dualtrack_jax.models import efficientnet
from dualtrack_jax.models import resnet_timm
from launch import bench_inference
from launch import config_utils
from launch import sharding
from launch import trainer
import tiny_runs
from ultrasound_common import checkpoints
from ultrasound_common import errors

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'baselines')
CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'dualtrack')
RTOL = 1e-5
TINY_HYBRID = dict(widths=(4, 4, 8, 8), stem_width=4, hidden=8, num_layers=1, num_heads=2,
                   max_positions=16)
TINY_DCLNET = dict(layers=(1, 1, 1, 1), widths=(32, 32, 32, 32), cardinality=4, stem_width=4)


@pytest.fixture(autouse=True)
def _float32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def relative_error(ours, original) -> float:
  ours, original = np.asarray(ours, np.float64), np.asarray(original, np.float64)
  assert ours.shape == original.shape, (ours.shape, original.shape)
  return float(np.max(np.abs(ours - original)) / np.max(np.abs(original)))


def golden_variables(golden, table, model, *args, **kwargs):
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return convert.from_torch(golden.state_dict(), template, table)


def random_variables(model, *args, seed=0, **kwargs):
  """Small random variables of `model` from its shapes (no init compile)."""
  rng = np.random.default_rng(seed)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):  # BatchNorm variances must be positive.
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, template)


def test_prevost_convnet_parity():
  golden = dualtrack_goldens.load_golden('prevost_convnet', FIXTURES)
  pairs = np.moveaxis(golden.random_input('pairs'), 1, -1)
  model = models.PrevostConvNet()
  variables = golden_variables(golden, baselines.PREVOST_CONVNET, model, pairs)
  error = relative_error(jax.jit(model.apply)(variables, pairs), golden.outputs['poses'])
  assert error <= RTOL, f'prevost_convnet: relative error {error:.2e}'


@pytest.mark.parametrize('name,model,table', [
    ('resnet10t', resnet_timm.ResNet10T(), baselines.RESNET10T),
    ('efficientnet_b1', efficientnet.EfficientNet(), baselines.EFFICIENTNET),
])
def test_timm_backbone_parity(name, model, table):
  """timm's resnet10t and efficientnet_b1 as train_2_frame_cnn.create_model builds them."""
  golden = dualtrack_goldens.load_golden(name, FIXTURES)
  pairs = np.moveaxis(golden.random_input('pairs'), 1, -1)
  variables = golden_variables(golden, table, model, pairs)
  error = relative_error(jax.jit(model.apply)(variables, pairs), golden.outputs['poses'])
  assert error <= RTOL, f'{name}: relative error {error:.2e}'
  # Export gives timm's state dict back: the same keys and tensors.
  state = golden.state_dict()
  exported = convert.to_torch(variables, table)
  assert sorted(exported) == sorted(state)
  assert all(np.array_equal(exported[k], state[k]) for k in state if 'num_batches' not in k)


def _euler_zyx(angles):
  """pytorch3d `euler_angles_to_matrix(angles, 'ZYX')`: Rz(a0) @ Ry(a1) @ Rx(a2), radians."""
  def axis(i, a):
    c, s = np.cos(a), np.sin(a)
    j, k = [n for n in range(3) if n != i]
    r = np.eye(3)
    r[j, j], r[j, k], r[k, j], r[k, k] = c, -s, s, c
    return r if i != 1 else r.T  # The y rotation's sines sit the other way round.
  return axis(2, angles[0]) @ axis(1, angles[1]) @ axis(0, angles[2])


def test_point_loss_matches_the_challenge_baseline():
  """baselines.point_mse against the TUS-REC baseline's formula, in NumPy, in its own frame.

  The challenge: label points C^-1 T0^-1 T1 C S p, predicted points T(params) S p with params
  (ZYX Euler angles in radians, translation) in the corner-origin image-mm frame, p the four
  1-based corner pixels (x, y, 0, 1); MSELoss over every coordinate. Ours: the same two transforms
  as pose vectors of the centred crop frame (0-based pixels), the crop's `pixel_to_image`.
  """
  rng = np.random.default_rng(0)
  h, w, scale = 48, 64, np.array([0.3, 0.25, 1.0])

  def rigid(angles, translation):
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = _euler_zyx(angles), translation
    return m

  s = np.diag([*scale, 1.0])  # pixel -> image mm (TUS-REC's calib_matrix.csv, first matrix)
  calib = rigid(rng.normal(0, 1, 3), rng.normal(0, 20, 3))  # image mm -> tool
  corners = np.array([[1, w, 1, w], [1, 1, h, h], [0] * 4, [1] * 4], np.float64)
  diffs, pred_vectors, target_vectors = [], [], []
  for _ in range(3):
    t0, t1 = (rigid(rng.normal(0, 0.5, 3), rng.normal(0, 50, 3)) for _ in range(2))
    label = np.linalg.inv(calib) @ np.linalg.inv(t0) @ t1 @ calib
    params = np.concatenate([rng.normal(0, 0.05, 3), rng.normal(0, 2, 3)])
    predicted = rigid(params[:3], params[3:])
    diffs.append((predicted @ s @ corners - label @ s @ corners)[:3])  # (xyz, points)
    # The same transforms in the centred frame: challenge mm = centred mm + scale * ((w+1)/2, ...).
    shift = np.eye(4)
    shift[:2, 3] = scale[:2] * (np.array([w, h]) + 1) / 2
    for m, out in ((predicted, pred_vectors), (label, target_vectors)):
      out.append(pose.matrix_to_pose_vector(np.linalg.inv(shift) @ m @ shift))
  diffs = np.stack(diffs)
  # torch.nn.MSELoss over (batch, xyz, points); PointDistance: the mean Euclidean distance.
  expected_loss = np.mean(np.square(diffs))
  expected_distance = np.mean(np.sqrt(np.sum(np.square(diffs), axis=1)))
  pixel_to_image = np.broadcast_to(transforms.centred_pixel_to_image(scale, (h, w)), (3, 4, 4))
  args = [jax.numpy.asarray(np.float32(a)) for a in (pred_vectors, target_vectors, pixel_to_image)]
  assert expected_distance > 1.0  # Rotations about a far-away tool origin: millimetres.
  np.testing.assert_allclose(float(baselines.point_mse(*args, (h, w))), expected_loss, rtol=1e-4)
  np.testing.assert_allclose(float(baselines.point_distance(*args, (h, w))), expected_distance,
                             rtol=1e-4)


def test_two_frame_backbones_and_their_switches():
  config = config_utils.load_config_file(os.path.join(CONFIGS, 'baseline_two_frame.py'))
  assert config.model.backbone == 'efficientnet_b1' and config.loss == 'pose'  # README command
  challenge = config_utils.load_config_file(
      f'{os.path.join(CONFIGS, "baseline_two_frame.py")}:challenge')
  assert (challenge.loss, challenge.model.backbone, challenge.model.drop_path) == (
      'points', 'efficientnet_b1', 0.2)
  for backbone, module in (('prevost', models.PrevostConvNet),
                           ('resnet10t', resnet_timm.ResNet10T),
                           ('efficientnet_b1', efficientnet.EfficientNet)):
    config.model.backbone = backbone
    assert isinstance(baseline_two_frame.network(config.model), module)
  config.model.norm = 'batch'
  with pytest.raises(errors.InputError, match=r"config.model.norm='batch'.*not efficientnet_b1"):
    baseline_two_frame.network(config.model)
  config.model.update(norm=None, backbone='prevost', drop_path=0.1)
  with pytest.raises(errors.InputError, match=r'config.model.drop_path=0.1.*not prevost'):
    baseline_two_frame.network(config.model)
  config.loss = 'ddf'
  with pytest.raises(errors.InputError, match=r"config.loss='ddf'.*pose, points"):
    baseline_two_frame.Experiment(config, load_data=False)


def test_two_frame_cnn_converts_from_and_to_torch():
  """launch.convert --model=two_frame_cnn: the backbone from the keys, the state dict back."""
  state = dualtrack_goldens.load_golden('resnet10t', FIXTURES).state_dict()
  config = config_utils.load_config_file(interface.converter_config('two_frame_cnn', 'full'))
  variables, config = interface.from_torch('two_frame_cnn', state, config, source='model.pt',
                                           allow_reinit=None, seed=0)
  assert config.model.backbone == 'resnet10t'
  back = interface.to_torch(variables, config, source='run')
  assert list(back) == list(state)
  assert all(np.array_equal(back[k], state[k]) for k in state if 'num_batches' not in k)
  with pytest.raises(errors.InputError, match=r'other.pt: not a train_2_frame_cnn.py model'):
    interface.from_torch('two_frame_cnn', {'stem.weight': np.zeros(1)}, config,
                         source='other.pt', allow_reinit=None, seed=0)
  # A model trained with --optical_flow: its stem takes 4 channels, and the config says so.
  flow_state = dict(state)
  stem = state['conv1.0.weight']
  flow_state['conv1.0.weight'] = np.concatenate([stem, stem], axis=1)
  variables, config = interface.from_torch('two_frame_cnn', flow_state, config, source='flow.pt',
                                           allow_reinit=None, seed=0)
  assert config.data.optical_flow
  assert np.array_equal(interface.to_torch(variables, config, source='run')['conv1.0.weight'],
                        flow_state['conv1.0.weight'])


def test_farneback_flow_measures_a_shift():
  """The optical-flow channels: a texture moved 2 px right and 1 px down has flow (2, 1)."""
  texture = ndimage.gaussian_filter(np.random.default_rng(0).random((80, 80)), 2.0)
  texture = 255 * (texture - texture.min()) / np.ptp(texture)  # Smooth speckle-like blobs.
  first = texture[8:72, 8:72].astype(np.uint8)
  second = texture[7:71, 6:70].astype(np.uint8)  # Content at (x, y) is now at (x + 2, y + 1).
  flow = baseline_two_frame.farneback_flow(np.stack([first, first]), np.stack([second, first]))
  assert flow.shape == (2, 64, 64, 2) and flow.dtype == np.float32
  np.testing.assert_allclose(np.median(flow[0, 16:48, 16:48], axis=(0, 1)), [2.0, 1.0], atol=0.1)
  np.testing.assert_allclose(flow[1, 16:48, 16:48], 0.0, atol=1e-3)  # The same frame twice.


@pytest.fixture(scope='module')
def sim_cache(tmp_path_factory):
  """One folder of simulated sweeps for every training test (they are generated once)."""
  return str(tmp_path_factory.mktemp('sim_cache'))


@pytest.fixture(scope='module')
def two_frame():
  """A 2-frame CNN experiment (model only) on 64 x 64 crops with random weights."""
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, "baseline_two_frame.py")}:sim')
  config.eval_batch_size = 4
  experiment = baseline_two_frame.Experiment(config, load_data=False)
  variables = random_variables(experiment.model, np.zeros((1, 64, 64, 2), np.float32))
  return experiment, variables


def test_two_frame_chains_n_minus_1_pairs(two_frame):
  experiment, variables = two_frame
  images = np.random.default_rng(0).integers(0, 255, (7, 64, 64), dtype=np.uint8)
  poses = experiment.predict(variables, dict(images=images))
  assert poses.shape == (6, 6) and poses.dtype == np.float64
  # Pair k is frames k and k + 1, whatever the chunking (4 pairs per batch, the last padded).
  single = experiment.predict(variables, dict(images=images[2:4]))
  np.testing.assert_allclose(poses[2], single[0], rtol=1e-5, atol=1e-6)


def test_two_frame_refuses_a_one_frame_sweep(two_frame):
  experiment, variables = two_frame
  with pytest.raises(errors.InputError, match=r'sweep_7: 1 frame\(s\), fewer than the 2'):
    experiment.predict(variables, dict(images=np.zeros((1, 64, 64), np.uint8),
                                       sweep_id='sweep_7'))


def test_two_frame_refuses_a_clip_backbone():
  config = config_utils.load_config_file(os.path.join(CONFIGS, 'baseline_two_frame.py'))
  config.model.backbone = 'dclnet'
  with pytest.raises(errors.InputError, match=r"config.model.backbone='dclnet'.*2-frame"):
    baseline_two_frame.Experiment(config, load_data=False)


@pytest.mark.slow
@pytest.mark.parametrize('name,data,model', [
    # With the optical-flow channels (the challenge case below runs without them).
    ('baseline_two_frame.py', dict(optical_flow=True), {}),
    # The challenge's point loss (on the Prevost ConvNet: EfficientNet-B1 compiles slowly).
    ('baseline_two_frame.py:challenge_sim', {}, dict(backbone='prevost', drop_path=0.0)),
    ('baseline_monet.py', dict(window=4, crop=(32, 32)),
     dict(widths=(4, 4, 8, 8), stem_width=4, lstm_hidden=8, lstm_layers=1)),
    ('baseline_dclnet.py', dict(crop=(32, 32)), TINY_DCLNET),
    ('baseline_hybrid.py', dict(crop=(32, 32)), TINY_HYBRID),
])
def test_sim_config_trains_and_evaluates(name, data, model, sim_cache, tmp_path, monkeypatch):
  """Each :sim config, shrunk: 2 training sweeps of 12 frames, 2 steps, then evaluation."""
  path, _, variant = name.partition(':')
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, path)}:{variant or "sim"}')
  config.data.synthetic.update(num_train=2, num_val=1, cache_dir=sim_cache)
  config.data.synthetic.simulator = dict(num_frames=(12, 12), height=64, width=80)
  config.data.update(data)
  config.model.update(model)
  if config.batch_size == 1:  # Whole sweeps, batch 1 as the original: one simulated device.
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: make_mesh(jax.devices()[:1]))
  else:
    config.batch_size = 8  # One element per simulated device.
  config.total_steps = 2
  config.warmup_epochs = 0
  config.eval_batch_size = 8
  final = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(final[common.GPE])


def test_lstm_matches_torch():
  golden = dualtrack_goldens.load_golden('lstm', FIXTURES)
  sequence = golden.random_input('sequence')
  model = models.TorchLSTM(8, num_layers=2)
  variables = golden_variables(golden, baselines.lstm_table(2), model, sequence)
  error = relative_error(jax.jit(model.apply)(variables, sequence), golden.outputs['hidden'])
  assert error <= RTOL, f'lstm: relative error {error:.2e}'


def test_monet_parity():
  golden = dualtrack_goldens.load_golden('monet', FIXTURES)
  frames = golden.random_input('frames')[:, :, 0]
  model = models.MoNet()
  variables = golden_variables(golden, baselines.monet_table(), model, frames)
  error = relative_error(jax.jit(model.apply)(variables, frames), golden.outputs['poses'])
  assert error <= RTOL, f'monet: relative error {error:.2e}'


@pytest.fixture(scope='module')
def monet():
  """A tiny MoNet experiment (model only) with random weights; CNN tiles of 3 frames."""
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, "baseline_monet.py")}:sim')
  config.model.update(widths=(4, 4, 8, 8), stem_width=4, lstm_hidden=8)
  config.data.crop = (32, 32)
  config.eval_tile = 3
  experiment = baseline_monet.Experiment(config, load_data=False)
  variables = random_variables(experiment.model, np.zeros((1, 3, 32, 32), np.float32))
  return experiment, variables


def test_monet_drops_the_first_output_and_tiles_exactly(monet):
  experiment, variables = monet
  images = np.random.default_rng(1).integers(0, 255, (9, 32, 32), dtype=np.uint8)
  poses = experiment.predict(variables, dict(images=images))
  assert poses.shape == (8, 6)
  whole = experiment.model.apply(variables, images[None] / 255.0)[0]
  np.testing.assert_allclose(poses, whole, rtol=1e-5, atol=1e-6)


def test_dclnet_parity():
  golden = dualtrack_goldens.load_golden('dclnet', FIXTURES)
  state = golden.state_dict()
  assert all(state.pop(k) is not None for k in baselines.DCLNET_UNUSED)
  clips = golden.random_input('clips')[:, 0]
  model = models.DCLNet()
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), clips))
  variables = convert.from_torch(state, template, baselines.DCLNET)
  error = relative_error(jax.jit(model.apply)(variables, clips), golden.outputs['poses'])
  assert error <= RTOL, f'dclnet: relative error {error:.2e}'


@pytest.fixture(scope='module')
def dclnet():
  """A tiny DCLNet experiment (model only) with random weights."""
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, "baseline_dclnet.py")}:sim')
  config.model.update(TINY_DCLNET)
  config.data.crop = (32, 32)
  config.eval_batch_size = 4
  experiment = baseline_dclnet.Experiment(config, load_data=False)
  variables = random_variables(experiment.model, np.zeros((1, 5, 32, 32), np.float32))
  return experiment, variables


def test_dclnet_sliding_window_gives_n_minus_1_poses(dclnet):
  experiment, variables = dclnet
  images = np.random.default_rng(2).integers(0, 255, (7, 32, 32), dtype=np.uint8)
  poses = experiment.predict(variables, dict(images=images))
  assert poses.shape == (6, 6)
  # Motion k (frame k -> k + 1) is the output of the window centred on frame k + 1; the first
  # two frames of the window of frame 1 are the zero padding.
  clip = np.concatenate([np.zeros((1, 32, 32), np.float32), images[:4] / np.float32(255)])
  np.testing.assert_allclose(poses[0], experiment.model.apply(variables, clip[None])[0],
                             rtol=1e-5, atol=1e-6)
  interior = images[1:6] / np.float32(255)
  np.testing.assert_allclose(poses[2], experiment.model.apply(variables, interior[None])[0],
                             rtol=1e-5, atol=1e-6)


def test_dclnet_refuses_a_sweep_shorter_than_its_window(dclnet, tmp_path):
  experiment, variables = dclnet
  with pytest.raises(errors.InputError, match=r'sweep_3: 4 frame\(s\), fewer than the 5'):
    experiment.predict(variables, dict(images=np.zeros((4, 32, 32), np.uint8), sweep_id='sweep_3'))


def test_dclnet_refuses_a_frame_pair_window():
  config = config_utils.load_config_file(os.path.join(CONFIGS, 'baseline_dclnet.py'))
  config.data.window = 2
  with pytest.raises(errors.InputError, match=r'config.data.window=2: DCLNet.*baseline_two_frame'):
    baseline_dclnet.Experiment(config, load_data=False)


@pytest.mark.parametrize('name,overrides', [
    ('baseline_two_frame', {}),
    ('baseline_monet', dict(widths=(4, 4, 8, 8), stem_width=4, lstm_hidden=8, lstm_layers=1)),
    ('baseline_dclnet', TINY_DCLNET),
    ('baseline_hybrid', TINY_HYBRID),
])
def test_inference_benchmark_cases_run(name, overrides):
  options = bench_inference.Options(sizes=(6,), steps=1)
  (case,) = [bench_inference.as_case(c, name) for c in baseline_benchmarks.INFERENCE_BENCHMARKS[
      name](options, overrides=overrides, crop=(64, 64))]
  (result,) = bench_inference.measure_case(case, options)
  assert result.output.shape[-1] == 6 and np.isfinite(result.output).all()
  assert name in interface.INFERENCE_BENCHMARKS


def test_hybrid_transformer_parity():
  golden = dualtrack_goldens.load_golden('hybrid_transformer', FIXTURES)
  state = golden.state_dict()
  assert all(state.pop(k) is not None for k in baselines.HYBRID_TRANSFORMER_UNUSED)
  frames = golden.random_input('frames')[:, :, 0]
  model = models.HybridTransformer()
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), frames))
  variables = convert.from_torch(state, template, baselines.HYBRID_TRANSFORMER)
  error = relative_error(jax.jit(model.apply)(variables, frames), golden.outputs['poses'])
  assert error <= RTOL, f'hybrid_transformer: relative error {error:.2e}'


@pytest.fixture(scope='module')
def hybrid():
  """A tiny hybrid transformer experiment (model only) with random weights; CNN tiles of 2."""
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, "baseline_hybrid.py")}:sim')
  config.model.update(TINY_HYBRID)
  config.data.crop = (32, 32)
  config.eval_tile = 2
  experiment = baseline_hybrid.Experiment(config, load_data=False)
  variables = random_variables(experiment.model, np.zeros((1, 3, 32, 32), np.float32))
  return experiment, variables


def test_hybrid_tiles_exactly_and_refuses_sweeps_beyond_its_positions(hybrid):
  experiment, variables = hybrid
  images = np.random.default_rng(3).integers(0, 255, (11, 32, 32), dtype=np.uint8)
  poses = experiment.predict(variables, dict(images=images))
  assert poses.shape == (10, 6)
  whole = experiment.model.apply(variables, images[None] / np.float32(255))[0]
  np.testing.assert_allclose(poses, whole, rtol=1e-5, atol=1e-6)
  with pytest.raises(errors.InputError, match=r'sweep_9: 17 frames exceed the 16 learned'):
    experiment.predict(variables, dict(images=np.zeros((17, 32, 32), np.uint8),
                                       sweep_id='sweep_9'))


def test_hybrid_two_stage_config_freezes_the_pretrained_cnn():
  config = config_utils.load_config_file(
      f'{os.path.join(CONFIGS, "baseline_hybrid.py")}:two_stage')
  assert config.cnn_frozen and tuple(config.frozen) == ('backbone/.*',)
  assert [tuple(m) for m in config.init_from.cnn.map] == [('backbone', 'backbone')]
  stage1 = config_utils.load_config_file(os.path.join(CONFIGS, 'local_stage1.py'))
  assert stage1.model.causal is False  # The switch the two-stage recipe's first command sets.


def _hybrid_cnn_run(workdir, **model):
  """A stage-1 run (random weights) of the tiny hybrid's CNN: causal, kernels (3, 1, 1, 1)."""
  config = config_utils.load_config_file(f'{os.path.join(CONFIGS, "local_stage1.py")}:sim')
  config.data.crop = (32, 32)
  config.model.update(dict(widths=TINY_HYBRID['widths'], stem_width=TINY_HYBRID['stem_width'],
                           temporal_kernels=(3, 1, 1, 1), causal=True), **model)
  shapes = jax.eval_shape(local_stage1.Experiment(config, load_data=False).init,
                          jax.random.key(0), {'images': np.zeros((1, 2, 32, 32), np.uint8)})
  return tiny_runs.save_run(str(workdir), config, tiny_runs.random_variables(shapes, 0))


def test_hybrid_two_stage_trains_on_cached_cnn_features(sim_cache, tmp_path):
  config = config_utils.load_config_file(
      f'{os.path.join(CONFIGS, "baseline_hybrid.py")}:two_stage')
  config.data.update(dataset='synthetic', crop=(32, 32))
  config.data.synthetic.update(num_train=2, num_val=1, cache_dir=sim_cache)
  config.data.synthetic.simulator = dict(num_frames=(12, 12), height=64, width=80)
  config.model.update(TINY_HYBRID)
  config.init_from.cnn.workdir = _hybrid_cnn_run(tmp_path / 'cnn')
  config.feature_cache.directory = str(tmp_path / 'features')
  experiment = baseline_hybrid.Experiment(config)
  directory, key = experiment.fill_feature_cache()
  assert experiment.fill_feature_cache() == (directory, key)  # Reused, same key.
  stage1 = checkpoints.read_variables(config.init_from.cnn.workdir)
  cnn = {c: {'backbone': t} for c, t in common.subtree(stage1, 'backbone').items()}
  record = experiment.train_records[0]
  cache = feature_cache.FeatureCache(directory, key)
  with sweeps.SweepReader(record.path) as reader:
    crops = common.center_crops(reader, (32, 32))[0]
  np.testing.assert_allclose(cache.load(record.sweep_id),
                             experiment.frame_features(cnn, crops)[0], rtol=1e-5, atol=1e-6)
  # Training batches carry the cached features instead of the images.
  batch = next(iter(experiment.train_dataset(seed=0, shard_index=0, shard_count=1)))
  assert 'images' not in batch and batch['features'].shape == (1, 12, 8)
  variables = random_variables(experiment.model, np.zeros((1, 3, 32, 32), np.float32))
  loss, (metrics, updates) = experiment.loss_fn(variables, batch, jax.random.key(0))
  assert np.isfinite(loss) and updates == {}
  # A file of another CNN's width under this key; a stage-1 CNN that is not causal.
  with h5py.File(cache.path(record.sweep_id), 'w') as f:
    f['features'] = np.zeros((12, 64), np.float32)
  with pytest.raises(errors.InputError, match=rf'{record.sweep_id}.h5: cached features of shape '
                     rf'\(12, 64\).*another CNN.*cache key {key}'):
    experiment.fill_feature_cache()
  config.init_from.cnn.workdir = _hybrid_cnn_run(tmp_path / 'not_causal', causal=False)
  with pytest.raises(errors.InputError, match=r"not_causal'?: its CNN \(model.causal=False"):
    experiment.fill_feature_cache()


@pytest.fixture(scope='module')
def short_sweeps(tmp_path_factory):
  """Two simulated 6-frame sweeps of 64 x 80 pixels (their registry records)."""
  root = tmp_path_factory.mktemp('short_sweeps')
  csv = simulator.write_dataset(
      root, config=simulator.SimulatorConfig(height=64, width=80, num_frames=(6, 6)),
      num_train=2, num_val=0, seed=0)
  return registry.read_sweep_csv(csv, 'train')


def test_frame_pairs_draw_one_pair_per_sweep_with_skips(short_sweeps):
  ds = pipeline.frame_pairs(short_sweeps, crop_hw=(32, 32), batch_size=2, seed=0, augment=None,
                            skip_p=1.0, shuffle=False, num_epochs=1)
  (batch,) = list(ds)
  assert batch['images'].shape == (2, 2, 32, 32) and batch['images'].dtype == np.uint8
  assert batch['targets'].shape == (2, 1, 6)
  for row, record in enumerate(short_sweeps):
    j = int(batch['start'][row])
    with sweeps.SweepReader(record.path) as reader:
      # Frames j and j + 2 (j + 2 < N), centre-cropped: the skip is always taken here.
      expected = common.center_crops(reader, (32, 32))[0][[j, j + 2]] if j + 2 < 6 else None
    if expected is not None:
      np.testing.assert_array_equal(batch['images'][row], expected)


def test_dclnet_refuses_a_sweep_file_shorter_than_its_window(dclnet, short_sweeps):
  experiment, variables = dclnet
  experiment.config.data.window = 7  # Longer than the 6-frame sweep file.
  experiment.min_frames = 7
  try:
    with sweeps.SweepReader(short_sweeps[0].path) as reader, pytest.raises(
        errors.InputError, match=rf'{short_sweeps[0].path}: 6 frame\(s\), fewer than the 7'):
      experiment.predict_sweep(variables, reader)
  finally:
    experiment.config.data.window = experiment.min_frames = 5


def test_two_frame_predicts_a_sweep_file(two_frame, short_sweeps):
  experiment, variables = two_frame
  with sweeps.SweepReader(short_sweeps[0].path) as reader:
    poses = experiment.predict_sweep(variables, reader)
  assert poses.shape == (5, 6) and np.isfinite(poses).all()
