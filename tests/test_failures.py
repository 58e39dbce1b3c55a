"""Bad input gets one clear line, never a traceback (ultrasound_common/errors.py).

Each command line runs in a subprocess on inputs of the test's own making; the exit status, the
single `<command>: error: ...` line, the file or key it names and the absence of a traceback are
checked. The readers' guards (sizes, bit depths, damaged data) are checked in process.
"""
import glob
import os
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
from PIL import Image
import pytest

from dualtrack_jax.data import simulator
from dualtrack_jax.data import sweeps
from launch import config_utils
from launch import metric_writer
from launch import trainer
from sonichu_jax import preprocess
from ultrasound_common import errors
import cpu_env
import toy_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
TOY = os.path.join(TESTS, 'toy_experiment.py')


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cpu_env.xla_flags(1),
             PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line(result: subprocess.CompletedProcess, command: str, *parts: str) -> str:
  """The error line; checks the exit status, that it is alone of its kind and names `parts`."""
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith(f'{command}: error: ')]
  assert len(lines) == 1, result.stderr[-2000:]
  for part in parts:
    assert part in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  return toy_experiment.write_teacher(str(tmp_path_factory.mktemp('data') / 'teacher.npz'))


@pytest.mark.slow
def test_train_config_problems_are_one_line(teacher, tmp_path):
  bad_syntax = tmp_path / 'bad.py'
  bad_syntax.write_text('def get_config(:\n')
  no_function = tmp_path / 'none.py'
  no_function.write_text('X = 1\n')
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  workdir = str(tmp_path / 'run')
  data = f'--config.data_file={teacher}'
  cases = [
      ((f'--config={tmp_path}/nope.py', f'--workdir={workdir}'), ('nope.py: no such config',)),
      ((f'--config={bad_syntax}', f'--workdir={workdir}'), (f'{bad_syntax}:1: not a valid',)),
      ((f'--config={no_function}', f'--workdir={workdir}'), ('defines get_config',)),
      (('--config=configs/dualtrack/local_stage1.py:bogus', f'--workdir={workdir}'),
       ("unknown variant 'bogus'",)),
      ((f'--config={TOY}', data, '--config.batch_size=0', f'--workdir={workdir}'),
       ('config.batch_size=0 must be positive',)),
      ((f'--config={TOY}', data, '--config.total_steps=0', f'--workdir={workdir}'),
       ('config.total_steps=0 gives 0 steps',)),
      ((f'--config={TOY}', data, '--config.total_steps=2',
        '--config.optim.schedule=linear_warmup_cosine', f'--workdir={workdir}'),
       ('needs a warm-up shorter than the run', 'gives 4 warm-up steps, the run has 2')),
      ((f'--config={TOY}', data, f'--workdir={a_file}'), (f'--workdir={a_file} is a file',)),
  ]
  for args, parts in cases:
    _one_line(_run('launch.train', *args), 'launch.train', *parts)
  assert not os.path.exists(workdir)


def test_every_key_the_docs_name_exists_in_the_configs():
  # launch/train.py documents these; the README tells users to pass --config.fsdp=True.
  for spec in ('configs/dualtrack/local_stage1.py:sim', 'configs/dualtrack/fusion.py',
               'configs/sonichu/keypoints.py:sim'):
    config = config_utils.load_config_file(os.path.join(ROOT, spec))
    assert set(config_utils.runtime_keys()) <= set(config), spec


@pytest.mark.slow
def test_other_commands_report_bad_input_in_one_line(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  _one_line(_run('launch.evaluate', f'--workdir={empty}'), 'launch.evaluate',
            f'{empty}: no checkpoint found')
  result = _run('launch.evaluate', f'--workdir={empty}', '--traceback')  # For a bug report.
  assert result.returncode == 1 and 'Traceback' in result.stderr
  assert 'MissingFileError' in result.stderr
  _one_line(_run('launch.predict', f'--checkpoint={tmp_path}/none', '--sweep=a.h5'),
            'launch.predict', f'--checkpoint={tmp_path}/none: no such folder')
  _one_line(_run('launch.predict', '--sweep=a.h5'), 'launch.predict',
            'Flag --checkpoint must have a value')
  _one_line(_run('launch.convert', f'--from={tmp_path}/missing.pt', f'--to={tmp_path}/run',
                 '--model=local_stage1'), 'launch.convert', f'{tmp_path}/missing.pt: no such file')
  _one_line(_run('launch.export', f'--workdir={empty}', f'--out={tmp_path}/export'),
            'launch.export', 'no checkpoint found')
  _one_line(_run('launch.benchmark', '--bench=gpu'), 'launch.benchmark',
            "--bench='gpu': unknown")
  _one_line(_run('dualtrack_jax.data.tusrec', f'--data_dir={empty}', f'--out={tmp_path}/out'),
            'dualtrack_jax.data.tusrec', f'{empty}: no TUS-REC scans')


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named(teacher, tmp_path):
  config = toy_experiment.get_config()
  config.data_file = teacher
  config.total_steps = 4
  config.warmup_epochs = 0
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  step_dir = os.path.join(workdir, 'best', '4')
  for path in glob.glob(os.path.join(step_dir, '**', '_METADATA'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(10)
  image = str(tmp_path / 'image.npy')
  np.save(image, np.zeros((8, 8), np.float32))
  for command, args in (('launch.predict', (image, f'--checkpoint={workdir}')),
                        ('launch.evaluate', (f'--workdir={workdir}',)),
                        ('launch.export', (f'--workdir={workdir}', f'--out={tmp_path}/export'))):
    _one_line(_run(command, *args), command, f'{step_dir}: cannot read the checkpoint')


def _png_header_claiming(path: str, width: int, height: int) -> None:
  """A PNG whose IHDR declares width x height (and one tiny, wrong data chunk)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0'))
            + chunk(b'IEND', b''))


def test_images_of_any_depth_are_read_right_or_refused_by_name(tmp_path):
  values = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
  sixteen = str(tmp_path / 'deep.png')
  Image.fromarray(values).save(sixteen)
  with Image.open(sixteen) as image:
    assert image.mode.startswith('I')  # PIL's convert('L') would clip this to {0, 255}
  np.testing.assert_array_equal(preprocess.read_gray(sixteen),
                                np.rint(values / 257.0).astype(np.uint8))
  rgba = str(tmp_path / 'rgba.png')
  Image.fromarray(np.full((2, 3, 4), 200, np.uint8)).save(rgba)
  np.testing.assert_array_equal(preprocess.read_gray(rgba), np.full((2, 3), 200, np.uint8))
  floats = str(tmp_path / 'float.tiff')
  Image.fromarray(np.zeros((2, 2), np.float32)).save(floats)
  with pytest.raises(errors.InputError, match=r"float\.tiff: 'F' images"):
    preprocess.read_gray(floats)
  bomb = str(tmp_path / 'bomb.png')
  _png_header_claiming(bomb, 65000, 65000)
  with pytest.raises(errors.InputError, match=r'bomb\.png: the image is too large'):
    preprocess.read_gray(bomb)
  _png_header_claiming(bomb, 10000, 8000)  # Below PIL's limit, above ours.
  with pytest.raises(errors.InputError, match=r'bomb\.png: the image declares 10000x8000 pixels'):
    preprocess.read_gray(bomb)
  garbage = tmp_path / 'garbage.png'
  garbage.write_bytes(b'not an image')
  with pytest.raises(errors.InputError, match=r'garbage\.png: cannot read the image'):
    preprocess.read_gray(str(garbage))


def test_sweep_sizes_are_checked_before_anything_is_allocated(tmp_path):
  path = str(tmp_path / 'huge.h5')
  sweep = simulator.simulate_sweep(simulator.SimulatorConfig(height=8, width=8,
                                                             num_frames=(2, 2)), seed=0)
  sweeps.write_sweep(path, **sweep)
  with h5py.File(path, 'r+') as f:
    del f[sweeps.IMAGES]
    # Declared, never written: HDF5 allocates chunks only when they are written.
    f.create_dataset(sweeps.IMAGES, shape=(2, 40000, 40000), dtype=np.uint8, chunks=(1, 64, 64))
    f[sweeps.DIMENSIONS][...] = [40000, 40000, 1]
  with pytest.raises(sweeps.SweepFileError, match=r"huge\.h5: key 'images': frames of "
                                                  r'40000x40000 pixels: more than the 16'):
    sweeps.validate_sweep(path)


def test_damaged_frame_data_names_the_file_and_the_frame(tmp_path):
  path = str(tmp_path / 'damaged.h5')
  sweep = simulator.simulate_sweep(simulator.SimulatorConfig(height=64, width=64,
                                                             num_frames=(6, 6)), seed=0)
  sweeps.write_sweep(path, **sweep)
  with h5py.File(path, 'r+') as f:
    # One gzip chunk per frame, as scanners' exports often are: damage fails to decompress.
    del f[sweeps.IMAGES]
    images = f.create_dataset(sweeps.IMAGES, data=sweep['images'], chunks=(1, 64, 64),
                              compression='gzip')
    offset = images.id.get_chunk_info(3).byte_offset
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(b'\xff' * 64)
  with sweeps.SweepReader(path) as reader:
    np.testing.assert_array_equal(reader.images(0, 2), sweep['images'][:2])
    with pytest.raises(sweeps.SweepFileError, match=r"damaged\.h5: key 'images': cannot read "
                                                    r'frames \[0, 6\)'):
      reader.images(0, 6)
    with pytest.raises(sweeps.SweepFileError, match="key 'images': cannot read frame 3"):
      reader.images_at([1, 3])


def test_tensorboard_tags_are_legal_names():
  assert metric_writer.tag('eval/sdr@10px/all') == 'eval/sdr_10px/all'
  assert metric_writer.tag('eval/mre/HC') == 'eval/mre/HC'
