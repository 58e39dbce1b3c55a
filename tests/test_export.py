"""Tests of launch/export.py and of the export specs of every model family.

Each family's tiny run (random variables saved as a run's best checkpoint, as in test_predict.py)
is exported once; one subprocess, in which the model packages cannot be imported, loads every
artifact and runs it on NumPy arrays at two batch sizes (and two sweep lengths), and the outputs
must match the live model's, computed here by each experiment's own prediction path. A second
subprocess, in which `launch` cannot be imported either, runs the README's loading snippet.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from dualtrack_jax import pose
from dualtrack_jax.data import simulator
from dualtrack_jax.data import sweeps
from dualtrack_jax.experiments import common
from dualtrack_jax.experiments import fusion
from dualtrack_jax.experiments import local_stage1
from launch import config_utils
from launch import experiment as experiment_lib
from launch import export
from sonichu_jax import preprocess
from sonichu_jax.experiments import keypoints
import toy_experiment
import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
# Raw frames of 40x49 with a 32x32 centre crop: W - w is odd, so the crop's centre is half a
# pixel off the frame's and the manifest's recipe must move the poses into the file's frame.
HEIGHT, WIDTH, CROP = 40, 49, (32, 32)
SHORT, LONG = 9, 13  # Sweep lengths: one sweep of SHORT frames, two of LONG (b = 1 and b = 2).
MODEL_PACKAGES = ('dualtrack_jax', 'sonichu_jax', 'toy_experiment')

# Imported first in the subprocesses: any import of the named top-level packages fails.
BLOCKER = textwrap.dedent("""\
    import sys

    class Blocker:
      def __init__(self, names):
        self.names = names

      def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in self.names:
          raise ImportError(f'{{name}} is blocked in this test')
        return None

    sys.meta_path.insert(0, Blocker({names!r}))
    """)



def readme_snippet() -> str:
  """The Python block of the README's export section (the snippet users copy)."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('## Export: a model without its code'):]
  start = section.index('```python\n') + len('```python\n')
  return section[start:section.index('\n```', start)]


def _dualtrack_config(name: str, base) -> ml_collections.ConfigDict:
  config = config_utils.load_config_file(os.path.join(CONFIGS, 'dualtrack', f'{name}:sim'))
  config.data.synthetic.cache_dir = str(base / 'no_cache')  # Never read: load_data=False.
  config.data.crop = CROP
  for key, value in dict(widths=(4, 4, 8, 8), stem_width=4, local_cnn_widths=(4, 4, 8, 8),
                         local_cnn_stem_width=4, global_cnn_widths=(4, 4, 8, 8),
                         global_cnn_stem_width=4, vit_feature_map_size=2, vit_layers=1,
                         temporal_layers=1, global_layers=1, fusion_layers=1,
                         grid_spacing=4).items():
    if key in config.model:
      config.model[key] = value
  config.eval_tile = 4  # Several exactly tiled windows in the live path.
  return config


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return tmp_path_factory.mktemp('export')


@pytest.fixture(scope='module')
def sweep_files(base):
  """One simulated sweep of SHORT frames and two of LONG frames, all HEIGHT x WIDTH."""
  paths = []
  for i, frames in enumerate((SHORT, LONG, LONG)):
    sim = simulator.SimulatorConfig(height=HEIGHT, width=WIDTH, num_frames=(frames, frames))
    path = str(base / f'sweep_{i}.h5')
    sweeps.write_sweep(path, **simulator.simulate_sweep(sim, seed=i))
    paths.append(path)
  return paths


def _restore(workdir: str) -> experiment_lib.Run:
  return experiment_lib.restore_run(workdir)


@pytest.fixture(scope='module')
def stage1(base):
  """(run, export folder) of a tiny stage-1 local encoder, exported through the CLI."""
  config = _dualtrack_config('local_stage1.py', base)
  experiment = local_stage1.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'images': np.zeros((1, 2, *CROP), np.uint8)})
  workdir = tiny_runs.save_run(str(base / 'stage1'), config, tiny_runs.random_variables(shapes, 1))
  out = str(base / 'exports' / 'stage1')
  result = _cli(f'--workdir={workdir}', f'--out={out}', '--platforms=cpu',
                f'--option=frame_size={HEIGHT}x{WIDTH}', '--option=max_frames=64')
  assert result.returncode == 0, result.stderr
  assert f'-> {out}' in result.stdout and 'frames (b, n, 40, 49) uint8' in result.stdout
  return _restore(workdir), out


@pytest.fixture(scope='module')
def dualtrack_sweep(base):
  """(run, export folder) of a reduced whole DualTrack model."""
  config = _dualtrack_config('fusion.py', base)
  experiment = fusion.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.model.init, jax.random.key(0),
                          np.zeros((1, 2, *CROP), np.float32), np.zeros((1, 1, 224, 224),
                                                                        np.float32))
  workdir = tiny_runs.save_run(str(base / 'fusion'), config, tiny_runs.random_variables(shapes, 2))
  run = _restore(workdir)
  out = str(base / 'exports' / 'fusion')
  export.export_run(run, out, platforms='cpu', options={'frame_size': f'{HEIGHT}x{WIDTH}'})
  return run, out


@pytest.fixture(scope='module')
def sonichu(base):
  """(run, export folder) of SONICHU with two tasks on a one-block ViT, flip TTA on."""
  config = config_utils.load_config_file(os.path.join(CONFIGS, 'sonichu', 'keypoints.py:sim'))
  config.data.tasks = ('fetal_femur', 'HC')
  config.model.update(embed_dim=16, depth=1, num_heads=2, head_filters=8)
  config.eval_tta = True
  experiment = keypoints.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'image': np.zeros((1, 256, 256, 3), np.float32)})
  workdir = tiny_runs.save_run(str(base / 'sonichu'), config, tiny_runs.random_variables(shapes, 3))
  run = _restore(workdir)
  out = str(base / 'exports' / 'sonichu')
  export.export_run(run, out, platforms='cpu')
  return run, out


@pytest.fixture(scope='module')
def toy(base):
  """(run, float32 export for every platform, bfloat16 export) of the tests' toy model."""
  config = toy_experiment.get_config()
  config.data_file = toy_experiment.write_teacher(str(base / 'teacher.npz'))
  experiment = toy_experiment.Experiment(config, load_data=False)
  shapes = jax.eval_shape(experiment.init, jax.random.key(0),
                          {'image': np.zeros((1, 8, 8, 1), np.float32)})
  workdir = tiny_runs.save_run(str(base / 'toy'), config, tiny_runs.random_variables(shapes, 4))
  run = _restore(workdir)
  out, out_bf16 = str(base / 'exports' / 'toy'), str(base / 'exports' / 'toy_bf16')
  export.export_run(run, out)
  export.export_run(run, out_bf16, dtype='bfloat16', platforms=['cpu'])
  return run, out, out_bf16


@pytest.fixture(scope='module')
def inputs(sweep_files):
  """The NumPy inputs of every artifact: {name: [input arrays of one call, ...]}."""
  frames = []
  for path in sweep_files:
    with sweeps.SweepReader(path) as reader:
      frames.append(reader.images(0, reader.num_frames))
  rng = np.random.default_rng(5)
  images = rng.uniform(0, 1, (3, 256, 256, 3)).astype(np.float32)
  toy_images = rng.standard_normal((5, 8, 8, 1)).astype(np.float32)
  sweeps_in = [frames[0][None], np.stack(frames[1:])]
  return {'stage1': sweeps_in, 'fusion': sweeps_in, 'sonichu': [images, images[:1]],
          'toy': [toy_images, toy_images[:2]], 'toy_bf16': [toy_images]}


def _python(code: str, blocked) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-c', BLOCKER.format(names=tuple(blocked)) + code],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def loaded(stage1, dualtrack_sweep, sonichu, toy, inputs, tmp_path_factory):
  """{name: [outputs of each call]} of every artifact, loaded and run in one subprocess where the
  model packages cannot be imported."""
  folder = tmp_path_factory.mktemp('loaded')
  folders = {'stage1': stage1[1], 'fusion': dualtrack_sweep[1], 'sonichu': sonichu[1],
             'toy': toy[1], 'toy_bf16': toy[2]}
  for name, calls in inputs.items():
    np.savez(folder / f'{name}_in.npz', *calls)
  code = textwrap.dedent(f"""
      import sys
      import numpy as np
      from launch import export
      folders = {folders!r}
      for name, directory in folders.items():
        model = export.load(directory)
        with np.load({str(folder)!r} + f'/{{name}}_in.npz') as data:
          calls = [data[f'arr_{{i}}'] for i in range(len(data.files))]
        outputs = {{}}
        for i, x in enumerate(calls):
          for key, value in model(x).items():
            outputs[f'{{i}}/{{key}}'] = np.asarray(value)
        np.savez({str(folder)!r} + f'/{{name}}_out.npz', **outputs)
      print(sorted(m for m in sys.modules if m.partition('.')[0] in {MODEL_PACKAGES!r}))
      """)
  result = _python(code, MODEL_PACKAGES)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == '[]'
  out = {}
  for name, calls in inputs.items():
    with np.load(folder / f'{name}_out.npz') as data:
      out[name] = [{k.partition('/')[2]: data[k] for k in data.files if k.startswith(f'{i}/')}
                   for i in range(len(calls))]
  return out


def _close(got, want, rtol=1e-5):
  """Equal to `rtol` relative to the largest magnitude (pose components can be near zero)."""
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def _crop_to_image(manifest, reader) -> np.ndarray:
  """The manifest's recipe: the crop's centred frame in the file's centred frame."""
  dx, dy = manifest['metadata']['crop_centre_offset_px']
  sx, sy = np.diag(reader.pixel_to_image)[:2]
  c = np.eye(4)
  c[:2, 3] = sx * dx, sy * dy
  return c


def _check_sweep_outputs(run, directory, outputs, sweep_files):
  """The artifact's poses, moved into the file's frame by the manifest's recipe, equal the live
  `predict_sweep`'s; its global transforms equal their float64 composition."""
  with open(os.path.join(directory, export.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['metadata']['crop_centre_offset_px'] == [-0.5, 0.0]
  got = [outputs[0]['relative_pose_vectors'][0], *outputs[1]['relative_pose_vectors']]
  globals_ = [outputs[0]['global_transforms'][0], *outputs[1]['global_transforms']]
  for vectors, global_transforms, path in zip(got, globals_, sweep_files):
    with sweeps.SweepReader(path) as reader:
      live = run.experiment.predict_sweep(run.variables, reader)
      crop_to_image = _crop_to_image(manifest, reader)
    assert vectors.shape == live.shape and vectors.dtype == np.float32
    _close(common.conjugate(vectors, crop_to_image), live)
    _close(global_transforms, pose.compose_relative(pose.pose_vector_to_matrix(
        vectors.astype(np.float64))), rtol=1e-5)
  return manifest


@pytest.mark.slow
def test_stage1_export_matches_live_predict_sweep(stage1, loaded, sweep_files):
  run, directory = stage1
  manifest = _check_sweep_outputs(run, directory, loaded['stage1'], sweep_files)
  frames = manifest['inputs'][0]
  assert frames['shape'] == ['b', 'n', HEIGHT, WIDTH] and frames['dtype'] == 'uint8'
  assert manifest['constraints'] == ['n >= 2', 'n <= 64']
  assert manifest['options'] == {'frame_size': '40x49', 'max_frames': '64',
                                 'fold_batch_norm': 'false'}
  assert manifest['source'] == {'experiment': 'dualtrack_jax.experiments.local_stage1',
                                'run_dir': run.run_dir, 'checkpoint_dir': run.checkpoint_dir,
                                'step': 7}
  assert manifest['platforms'] == ['cpu']


@pytest.mark.slow
def test_dualtrack_export_matches_live_predict_sweep(dualtrack_sweep, loaded, sweep_files):
  run, directory = dualtrack_sweep
  manifest = _check_sweep_outputs(run, directory, loaded['fusion'], sweep_files)
  assert manifest['constraints'][:2] == ['n >= 2', 'n <= 256']
  assert manifest['metadata']['global_frames']['source'] == 'resize'
  assert manifest['metadata']['local_crop'] == {'top': 4, 'left': 8, 'height': 32, 'width': 32}


@pytest.mark.slow
def test_dualtrack_weights_are_arguments_not_constants(dualtrack_sweep):
  run, directory = dualtrack_sweep
  with open(os.path.join(directory, export.FUNCTION), 'rb') as f:
    blob = f.read()
  exported = jax.export.deserialize(bytearray(blob))
  leaves = jax.tree.leaves(run.variables)
  assert len(exported.in_avals) == len(leaves) + 1  # The variables, then the frames.
  for leaf in sorted(leaves, key=lambda x: -x.size)[:5]:
    assert np.asarray(leaf).tobytes()[:64] not in blob


@pytest.mark.slow
def test_sonichu_export_matches_live_keypoints_with_flip_tta(sonichu, loaded, inputs):
  run, directory = sonichu
  images = inputs['sonichu'][0]
  normalised = (images - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD
  outputs = loaded['sonichu']
  for task, k in (('fetal_femur', 2), ('HC', 4)):
    live = run.experiment.predict_normalised(run.variables, normalised, task)
    assert outputs[0][f'keypoints_{task}'].shape == (3, k, 2)
    _close(outputs[0][f'keypoints_{task}'], live)
    _close(outputs[1][f'keypoints_{task}'], live[:1])
  with open(os.path.join(directory, export.MANIFEST)) as f:
    manifest = json.load(f)
  assert [o['name'] for o in manifest['outputs']] == ['keypoints_HC', 'keypoints_fetal_femur']
  assert manifest['metadata']['flip_tta'] is True
  assert manifest['options'] == {'tasks': 'fetal_femur,HC', 'flip_tta': 'true',
                                 'fold_batch_norm': 'false'}
  # Only the exported heads are shipped.
  assert sorted(manifest['metadata']['tasks']) == ['HC', 'fetal_femur']
  restored = export.load(directory).variables
  assert sorted(restored['params']) == ['backbone', 'heads_HC', 'heads_fetal_femur']


@pytest.mark.slow
def test_toy_export_matches_live_predict_in_both_dtypes(toy, loaded, inputs):
  run, directory, directory_bf16 = toy
  images = inputs['toy'][0]
  live = run.experiment.predict(run.variables, images)
  _close(loaded['toy'][0]['targets'], live)
  _close(loaded['toy'][1]['targets'], live[:2])
  # bfloat16 variables: the same function on rounded weights.
  _close(loaded['toy_bf16'][0]['targets'], live, rtol=3e-2)
  manifests = [export.read_manifest(d) for d in (directory, directory_bf16)]
  assert [m['dtype'] for m in manifests] == ['float32', 'bfloat16']
  assert manifests[0]['platforms'] == ['cpu', 'cuda', 'tpu']
  assert manifests[0]['jax_version'] == jax.__version__
  assert manifests[1]['variables']['bytes'] * 2 == manifests[0]['variables']['bytes']
  assert set(manifests[0]['files']) >= {export.FUNCTION, f'{export.PARAMS}/_METADATA'}


@pytest.mark.slow
def test_readme_snippet_runs_without_launch(toy):
  _, directory, _ = toy
  snippet = readme_snippet()
  assert "os.path.abspath('exports/femur')" in snippet
  code = snippet.replace("'exports/femur'", repr(directory)) + textwrap.dedent("""
      import sys
      assert sorted(outputs) == ['targets'] and outputs['targets'].shape == (2, 3)
      print(sorted(m for m in sys.modules if m.partition('.')[0] in ('launch', 'dualtrack_jax',
                                                                     'sonichu_jax')))
      """)
  result = _python(code, MODEL_PACKAGES + ('launch',))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == '[]'


@pytest.fixture
def toy_copy(toy, tmp_path):
  """A copy of the toy export that a test may damage."""
  directory = str(tmp_path / 'toy')
  shutil.copytree(toy[1], directory)
  return directory


def _flip_byte(path: str) -> None:
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_exports_are_refused_with_one_clear_message(toy_copy):
  function = os.path.join(toy_copy, export.FUNCTION)
  manifest_path = os.path.join(toy_copy, export.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  params = max((p for p in manifest['files'] if p.startswith('params/')),
               key=lambda p: manifest['files'][p]['bytes'])
  shutil.copy(function, function + '.good')
  _flip_byte(function)
  with pytest.raises(export.ExportError, match=r'model\.jaxexport: sha256 differs from '
                                               r'manifest\.json; the file was modified'):
    export.load(toy_copy)
  with open(function + '.good', 'rb') as f:
    good = f.read()
  with open(function, 'wb') as f:
    f.write(good[:-10])
  with pytest.raises(export.ExportError, match=rf'model\.jaxexport: {len(good) - 10} bytes, but '
                                               rf'manifest\.json says {len(good)}; the file is '
                                               'truncated'):
    export.load(toy_copy)
  shutil.move(function + '.good', function)
  _flip_byte(os.path.join(toy_copy, *params.split('/')))
  with pytest.raises(export.ExportError, match=f'{params}: sha256 differs'):
    export.load(toy_copy)

  newer = dict(manifest, jax_version='99.0.0')
  shutil.rmtree(os.path.join(toy_copy, 'params'))
  with open(manifest_path, 'w') as f:
    json.dump(dict(newer, files={k: v for k, v in manifest['files'].items()
                                 if not k.startswith('params/')}), f)
  with pytest.raises(export.ExportError, match=rf'exported with jax 99\.0\.0, but this is jax '
                                               rf'{jax.__version__}.*upgrade'):
    export.load(toy_copy)
  os.remove(manifest_path)
  with pytest.raises(export.ExportError, match=r'manifest\.json: missing; .* is not a complete '
                                               r'export'):
    export.load(toy_copy)


def test_wrong_inputs_name_the_input_and_the_expected_shape(toy, stage1):
  model = export.load(toy[1])
  with pytest.raises(export.ExportError, match=r"input 'images': expected shape \(b, 8, 8, 1\) "
                                               r'float32, got shape \(2, 8, 9, 1\) float32 '
                                               r'\(dimension 2 is 9, not 8\)'):
    model(np.zeros((2, 8, 9, 1), np.float32))
  with pytest.raises(export.ExportError, match=r"input 'images'.*\(dtype float64\)"):
    model(np.zeros((2, 8, 8, 1)))
  with pytest.raises(export.ExportError, match=r'\(rank 3\)'):
    model(np.zeros((8, 8, 1), np.float32))
  with pytest.raises(export.ExportError, match=r'expected 1 input\(s\), images \(b, 8, 8, 1\) '
                                               r'float32; got 2'):
    model(np.zeros((2, 8, 8, 1), np.float32), np.zeros(1))
  sweep_model = export.load(stage1[1])
  with pytest.raises(export.ExportError, match=r"shape constraint 'n >= 2': n = 1 \(input "
                                               r"'frames'\)"):
    sweep_model(np.zeros((1, 1, HEIGHT, WIDTH), np.uint8))
  with pytest.raises(export.ExportError, match=r"'n <= 64': n = 65"):
    sweep_model(np.zeros((1, 65, HEIGHT, WIDTH), np.uint8))


def test_options_are_validated_by_the_model(dualtrack_sweep, sonichu, tmp_path):
  cases = [
      (dualtrack_sweep, {}, 'export option frame_size=HxW is required'),
      (dualtrack_sweep, {'frame_size': '40by49'}, r"frame_size='40by49': expected HxW"),
      (dualtrack_sweep, {'frame_size': '20x49'}, 'smaller than the 32x32 centre crop'),
      (dualtrack_sweep, {'frame_size': '40x49', 'global_source': 'downsampled'},
       "global source 'downsampled'.*--option global_source=context"),
      (dualtrack_sweep, {'frame_size': '40x49', 'tile': '3'},
       r'--option tile: not an export option of dualtrack_jax.experiments.fusion \(it takes '
       r'fold_batch_norm, frame_size, global_source\)'),
      (sonichu, {'tasks': 'HC,femur'}, "tasks=HC,femur: Unknown SONICHU task 'femur'"),
      (sonichu, {'flip_tta': 'maybe'}, "flip_tta='maybe': expected true or false"),
  ]
  for (run, _), options, message in cases:
    with pytest.raises(ValueError, match=message):
      export.export_run(run, str(tmp_path / 'out'), options=options)
  assert not os.listdir(tmp_path)  # Nothing written, no temporary folder left.
  with pytest.raises(export.ExportError, match='--dtype=float16: expected one of'):
    export.export_run(sonichu[0], str(tmp_path / 'out'), dtype='float16')
  with pytest.raises(export.ExportError, match='--platforms=cpu,gpu: expected distinct names'):
    export.export_run(sonichu[0], str(tmp_path / 'out'), platforms='cpu,gpu')
  with pytest.raises(export.ExportError, match=r'--option=frame_size: expected KEY=VALUE'):
    export.parse_options(['frame_size'])


def _cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.path.join(ROOT, 'tests'))
  return subprocess.run([sys.executable, '-m', 'launch.export', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_errors_are_one_line(stage1, base):
  run, out = stage1
  for args, message in [
      ((f'--workdir={run.run_dir}', f'--out={out}'), f'--out={out} exists; an export never '
                                                     'overwrites'),
      ((f'--workdir={run.run_dir}', f'--out={base / "new"}', '--option=size=3',
        f'--option=frame_size={HEIGHT}x{WIDTH}'),
       '--option size: not an export option of dualtrack_jax.experiments.local_stage1'),
      ((f'--workdir={base / "missing"}', f'--out={base / "new"}'), 'no checkpoint found')]:
    result = _cli(*args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('launch.export: error: ')
    assert message in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(base / 'new')
