"""Tests of DualTrack's sweep prediction (dualtrack_jax/predict.py through launch/predict.py) and the
stage-1 `predict_sweep`: whole-sweep outputs of a checkpoint.

The checkpoint is an initialised (untrained) tiny stage-1 model saved as a run's best variables:
prediction needs no training, and its outputs are checked against the evaluation code path.
"""
import json
import os
import subprocess
import sys

import h5py
import ml_collections
import numpy as np
import pytest

from dualtrack_jax import metrics
from dualtrack_jax import pose
from dualtrack_jax import predict as sweep_predict
from dualtrack_jax import volume
from dualtrack_jax.data import registry
from dualtrack_jax.data import simulator
from dualtrack_jax.data import sweeps
from dualtrack_jax.data import transforms
from dualtrack_jax.experiments import common
from launch import config_utils
from launch import experiment as experiment_lib
from launch import predict
import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 40x49 frames with a 32x32 centre crop: W - w is odd, so the crop's centred frame is half a pixel
# off the file's and predict_sweep must conjugate its motions into the file's frame.
HEIGHT, WIDTH, FRAMES = 40, 49, 12
OUTPUTS = ['mask.nii.gz', 'metrics.json', 'poses.h5', 'slices.png', 'trajectory.png',
           'volume.nii.gz']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(run folder, sweep path) of a tiny stage-1 checkpoint and a simulated sweep with landmarks."""
  base = tmp_path_factory.mktemp('predict')
  _, workdir = tiny_runs.stage1_run(str(base / 'run'), str(base / 'no_cache'))
  sim = simulator.SimulatorConfig(height=HEIGHT, width=WIDTH, num_frames=(FRAMES, FRAMES),
                                  speed_mm_per_frame=(0.3, 0.5))
  sweep = simulator.simulate_sweep(sim, seed=3)
  landmarks = np.array([[1, 3, 4], [5, 40, 30], [11, 49, 40]])
  path = str(base / 'sweep one.h5')
  sweeps.write_sweep(path, **{**sweep, 'landmarks': landmarks})  # Landmarks of its own.
  assert not os.path.exists(base / 'no_cache')
  return workdir, path


@pytest.fixture(scope='module')
def restored(run):
  return experiment_lib.restore_run(run[0])


def predict_sweeps(restored, out=None, **options):
  """What `launch.predict --sweep/--dataset` does: the package's plan, published by the runtime."""
  units = sweep_predict.plan(restored, **options)
  return predict.publish(units, out or predict.default_out(restored))


def test_restore_finds_the_best_checkpoint(run, restored):
  assert restored.step == 7
  assert restored.checkpoint_dir == os.path.join(run[0], 'best', '7')
  assert restored.run_dir == run[0]
  assert experiment_lib.restore_run(restored.checkpoint_dir).step == 7  # a step folder works too
  with pytest.raises(FileNotFoundError, match='--checkpoint=/no/such/run: no such folder'):
    experiment_lib.restore_run('/no/such/run')


def test_predict_writes_every_output(run, restored, tmp_path):
  _, path = run
  out = str(tmp_path / 'out')
  results = predict_sweeps(restored, sweep_paths=[path], out=out, spacing_mm=0.5)
  assert os.listdir(out) == ['sweep_one']  # no temporary folder left
  folder = os.path.join(out, 'sweep_one')
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask  # not a private temporary folder's
  assert sorted(os.listdir(folder)) == OUTPUTS

  with sweeps.SweepReader(path) as reader:
    tracking, p2i, images = reader.tracking, reader.pixel_to_image, reader.images(0, FRAMES)
  with h5py.File(os.path.join(folder, 'poses.h5'), 'r') as f:
    vectors = f['relative_pose_vectors'][()]
    relative, pred = f['relative_transforms'][()], f['global_transforms'][()]
    gt = f['tracking_global_transforms'][()]
    assert f.attrs['step'] == 7 and 'centred' in f.attrs['image_frame']
    assert 'frame-0' in f['global_transforms'].attrs['meaning']
  assert vectors.shape == (FRAMES - 1, 6) and pred.shape == (FRAMES, 4, 4)
  np.testing.assert_allclose(relative, pose.pose_vector_to_matrix(vectors), atol=1e-12)
  np.testing.assert_allclose(pred, pose.compose_relative(relative), atol=1e-12)
  np.testing.assert_allclose(gt, pose.global_transforms(tracking), atol=1e-12)

  # The evaluation path in the crop's frame (local_stage1.evaluate): the crop's predictions and
  # tracking, the full frame's pixels. Displacements do not depend on the frame they are
  # expressed in, so every DDF metric must agree with predict's, made in the file's frame.
  top, left = transforms.center_crop_params((HEIGHT, WIDTH), (32, 32))
  assert (WIDTH - 32) % 2 == 1 and left == 8
  crop = transforms.center_crop(dict(images=images, tracking=tracking, pixel_to_image=p2i),
                                (32, 32))
  crop_pred = common.trajectory(restored.experiment.predict(restored.variables,
                                                                   crop['images']))
  crop_p2i = crop['pixel_to_image'] @ common._pixel_translation(-left, -top)
  expected = metrics.sweep_metrics(crop_pred, pose.global_transforms(crop['tracking']), crop_p2i,
                                    (HEIGHT, WIDTH), all_pixels=True)
  with open(os.path.join(folder, 'metrics.json')) as f:
    summary = json.load(f)
  got = summary['metrics']
  assert got == results['sweep one']
  assert summary['sweep'] == path and summary['step'] == 7
  ddf = [k for k in expected if k.startswith('ddf/')]
  assert len(ddf) == 10
  assert [got[k] for k in ddf] == pytest.approx([expected[k] for k in ddf], rel=1e-6, abs=1e-9)
  # The model predicts in the crop's centred frame, half a pixel (0.15 mm) left of the file's:
  # crop_to_image is a translation by -0.15 mm in x, and the motions are conjugated by it.
  crop_to_image = np.eye(4)
  crop_to_image[0, 3] = -0.5 * p2i[0, 0]
  crop_relative = pose.relative_transforms(crop_pred)
  np.testing.assert_allclose(
      relative, crop_to_image @ crop_relative @ np.linalg.inv(crop_to_image), atol=1e-9)
  assert np.abs(relative - crop_relative).max() > 1e-5  # the conjugation does change them
  for key in ('mae/z', 'drift/hausdorff', 'tusrec/GPE', 'tusrec/LLE', 'tusrec/score',
              'tusrec/largest_GLE', 'ddf/all-pts-avg_local_displacement_error'):
    assert np.isfinite(got[key]), key


def test_volume_is_compounded_at_the_predicted_poses(run, restored, tmp_path):
  _, path = run
  out = str(tmp_path / 'out')
  predict_sweeps(restored, sweep_paths=[path], out=out, spacing_mm=0.4,
                         volume_format='h5', compounding='trilinear')
  folder = os.path.join(out, 'sweep_one')
  assert sorted(os.listdir(folder)) == sorted(
      ['metrics.json', 'poses.h5', 'slices.png', 'trajectory.png', 'volume.h5'])
  with h5py.File(os.path.join(folder, 'poses.h5'), 'r') as f:
    pred = f['global_transforms'][()]
  with sweeps.SweepReader(path) as reader:
    expected = volume.reconstruct(reader.images(0, FRAMES), pred,
                                              reader.pixel_to_image, 0.4, method='trilinear')
  with h5py.File(os.path.join(folder, 'volume.h5'), 'r') as f:
    np.testing.assert_array_equal(f['volume'][()], expected.data)
    np.testing.assert_array_equal(f['mask'][()], expected.mask)
    np.testing.assert_array_equal(f['spacing'][()], [0.4, 0.4, 0.4])
    np.testing.assert_array_equal(f['origin'][()], expected.grid.origin)


def test_sweep_without_tracking_gets_poses_and_volume_but_no_metrics(run, restored, tmp_path):
  _, path = run
  sensorless = str(tmp_path / 'sensorless.h5')
  with h5py.File(path, 'r') as src, h5py.File(sensorless, 'w') as dst:
    for key in src:
      if key != sweeps.TRACKING:
        src.copy(key, dst)
  out = str(tmp_path / 'out')
  results = predict_sweeps(restored, sweep_paths=[sensorless], out=out, spacing_mm=0.5,
                                   volume_format='h5')
  assert results == {'sensorless': {}}
  folder = os.path.join(out, 'sensorless')
  assert sorted(os.listdir(folder)) == ['poses.h5', 'slices.png', 'trajectory.png', 'volume.h5']
  with h5py.File(os.path.join(folder, 'poses.h5'), 'r') as f:
    assert 'tracking_global_transforms' not in f
    vectors = f['relative_pose_vectors'][()]
  with sweeps.SweepReader(path) as reader:  # The same frames with tracking: the same poses.
    np.testing.assert_allclose(
        vectors, restored.experiment.predict_sweep(restored.variables, reader), atol=1e-12)


def test_dataset_input_reruns_replace_and_failures_leave_nothing(run, restored, tmp_path):
  _, path = run
  csv = str(tmp_path / 'sweeps.csv')
  registry.write_sweep_csv(csv, [registry.SweepRecord('val/7', path, 'val'),
                                 registry.SweepRecord('train_1', path, 'train')])
  out = str(tmp_path / 'out')
  first = predict_sweeps(restored, dataset=csv, split='val', out=out)
  assert list(first) == ['val/7'] and os.listdir(out) == ['val_7']
  stamp = os.path.join(out, 'val_7', 'stale')
  open(stamp, 'w').close()
  predict_sweeps(restored, dataset=csv, split='val', out=out)
  assert sorted(os.listdir(os.path.join(out, 'val_7'))) == OUTPUTS  # replaced as a whole
  assert os.listdir(out) == ['val_7']
  # A failure half-way (the volume is refused) leaves no folder for the sweep.
  with pytest.raises(ValueError, match='max_voxels=10'):
    predict_sweeps(restored, dataset=csv, split='train', out=out, max_voxels=10)
  assert os.listdir(out) == ['val_7']


def test_input_errors_name_what_is_wrong(run, restored, tmp_path):
  _, path = run
  with pytest.raises(ValueError, match='not both and not neither'):
    predict_sweeps(restored, out=str(tmp_path))
  with pytest.raises(ValueError, match='not both'):
    predict_sweeps(restored, sweep_paths=[path], dataset='tus-rec', out=str(tmp_path))
  with pytest.raises(ValueError, match="'sweep one' would both write 'sweep_one'"):
    predict_sweeps(restored, sweep_paths=[path, path], out=str(tmp_path))
  with pytest.raises(ValueError, match='--volume_format must be one of'):
    predict_sweeps(restored, sweep_paths=[path], volume_format='nrrd')
  small = str(tmp_path / 'small.h5')
  sweep = simulator.simulate_sweep(simulator.SimulatorConfig(height=16, width=48,
                                                             num_frames=(3, 3)), seed=0)
  sweeps.write_sweep(small, **sweep)
  with pytest.raises(sweeps.SweepFileError,
                     match=r"small\.h5: key 'images': frames of 16x48 pixels are smaller than "
                           r'the 32x32 centre crop'):
    predict_sweeps(restored, sweep_paths=[small], out=str(tmp_path / 'o'))
  assert os.listdir(tmp_path / 'o') == []


def test_experiments_without_prediction_support_are_refused(tmp_path, monkeypatch):
  (tmp_path / 'data_only.py').write_text(
      'class Experiment:\n  def __init__(self, config):\n    self.config = config\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  config = ml_collections.ConfigDict({'experiment': 'data_only'})
  with pytest.raises(config_utils.ConfigError,
                     match="'data_only' cannot build its model without its dataset"):
    experiment_lib.load_experiment(config, load_data=False)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'launch.predict', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli(run, tmp_path):
  workdir, path = run
  result = _cli(f'--checkpoint={workdir}', f'--sweep={path}', '--spacing_mm=0.6')
  assert result.returncode == 0, result.stderr
  out = os.path.join(workdir, 'predict', 'best_7', 'sweep_one')
  assert sorted(os.listdir(out)) == OUTPUTS
  assert 'tusrec/GPE' in result.stdout and f'Wrote {out}' in result.stdout
  missing = str(tmp_path / 'missing.h5')
  result = _cli(f'--checkpoint={workdir}', f'--sweep={missing}')
  assert result.returncode == 1
  assert f'launch.predict: error: {missing}: file does not exist' in result.stderr
  assert 'Traceback' not in result.stderr
