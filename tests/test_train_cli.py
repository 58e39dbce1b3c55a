"""End-to-end tests of `python -m launch.train` in subprocesses, with the toy experiment.

The reference is one uninterrupted 24-step run on 8 CPU devices (checkpoints at 8, 16, 24). A run
killed with SIGKILL and restarted with the same command ends bit-identical to it: the resumed
process restores the exact parameters, optimiser state, RNG key and data-iterator position and
runs the same compiled program on the same devices, and XLA:CPU is deterministic.
"""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import checkpointing
from launch import sharding
import cpu_env
import toy_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')

# Runs launch.train with Grain's iterator-checkpoint handler hanging from the second save on: the
# process is then killed while Orbax is writing checkpoint 16.
HANG_IN_SECOND_SAVE = """
import time
from grain._src.python.checkpoint import handler
_save, _calls = handler.CheckpointHandler.save, []
def save(self, *args, **kwargs):
  _calls.append(None)
  if len(_calls) >= 2:
    time.sleep(600)
  return _save(self, *args, **kwargs)
handler.CheckpointHandler.save = save
from launch import train
train.run()
"""


def _env(devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([TESTS, ROOT, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = cpu_env.xla_flags(devices)
  return env


def _args(teacher: str, workdir: str, *overrides: str) -> list[str]:
  return ['--config=' + os.path.join(TESTS, 'toy_experiment.py'),
          f'--config.data_file={teacher}', f'--workdir={workdir}', *overrides]


def _train(teacher, workdir, *overrides, devices=8, timeout=240):
  return subprocess.run([sys.executable, '-m', 'launch.train', *_args(teacher, workdir,
                                                                     *overrides)],
                        cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                        timeout=timeout)


def _start(teacher, workdir, *overrides, script=None):
  """Starts a training process in the background; its output goes to `<workdir>.log`."""
  command = ([sys.executable, '-c', script] if script else
             [sys.executable, '-m', 'launch.train'])
  with open(workdir + '.log', 'w') as log:  # a file, not a pipe that could fill up and block
    return subprocess.Popen(command + _args(teacher, workdir, *overrides), cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for(condition, process, workdir, timeout=180.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      with open(workdir + '.log') as log:
        pytest.fail(f'process exited early ({process.returncode}):\n{log.read()}')
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail('timed out waiting for the run')
    time.sleep(0.05)


def _kill(process):
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=30)


def _steps(workdir):
  directory = os.path.join(workdir, checkpointing.LATEST_DIR)
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _final_variables(workdir):
  directory, step = checkpointing.find_checkpoint(workdir, 'latest')
  assert step == 24
  variables, _ = checkpointing.restore_variables(
      directory, step, sharding.replicated(sharding.make_mesh()))
  return jax.device_get(variables)


def _assert_trees(got, want, **tolerance):
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  assert [p for p, _ in got_leaves] == [p for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
  for (path, x), y in zip(got_leaves, jax.tree.leaves(want)):
    if tolerance:
      np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerance)
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  return toy_experiment.write_teacher(str(tmp_path_factory.mktemp('data') / 'teacher.npz'))


@pytest.fixture(scope='module')
def reference_run(teacher, tmp_path_factory):
  """The workdir of one uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  result = _train(teacher, workdir)
  assert result.returncode == 0, result.stderr
  assert 'step 24/24 | loss' in result.stderr and 'eval @ step 24: mse=' in result.stderr
  assert _steps(workdir) == [16, 24]  # keep_checkpoints = 2
  return workdir


@pytest.fixture(scope='module')
def reference(reference_run):
  return _final_variables(reference_run)


def test_resume_after_sigkill_is_exact(teacher, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  # Slowed down so that the kill lands mid-training, after the first checkpoint.
  process = _start(teacher, workdir, '--config.toy.sleep_per_batch=0.2')
  _wait_for(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', '8')), process, workdir)
  _kill(process)
  assert 24 not in _steps(workdir)
  result = _train(teacher, workdir)
  assert result.returncode == 0, result.stderr
  assert 'Resumed from' in result.stderr
  # The changed key is reported (a warning, not an error).
  assert 'toy.sleep_per_batch: 0.2 -> 0.0' in result.stderr
  _assert_trees(_final_variables(workdir), reference)


def test_sigterm_saves_the_current_step_and_resumes_exactly(teacher, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  process = _start(teacher, workdir, '--config.toy.sleep_per_batch=0.2')
  _wait_for(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', '8')), process, workdir)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 128 + signal.SIGTERM
  with open(workdir + '.log') as log:
    output = log.read()
  match = re.search(r'launch.train: error: SIGTERM at step (\d+) of 24: saved (\S+); run the '
                    'same command again to resume', output)
  assert match, output
  stopped = int(match.group(1))
  assert 8 <= stopped < 24 and stopped in _steps(workdir)
  assert match.group(2) == os.path.join(workdir, 'checkpoints', str(stopped))
  assert 'Traceback' not in output
  result = _train(teacher, workdir)
  assert result.returncode == 0, result.stderr
  assert f'Resumed from {workdir} at step {stopped}' in result.stderr
  _assert_trees(_final_variables(workdir), reference)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(teacher, reference_run,
                                                                  reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_run, workdir)
  damaged = os.path.join(workdir, 'checkpoints', '24')
  for path in glob.glob(os.path.join(damaged, '**', '*'), recursive=True):
    if os.path.isfile(path) and path.endswith(('_METADATA', '.json', '_CHECKPOINT_METADATA')):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  result = _train(teacher, workdir)
  assert result.returncode == 0, result.stderr
  assert f'Checkpoint {damaged} cannot be read' in result.stderr
  assert f'Resumed from {workdir} at step 16' in result.stderr
  assert os.path.isdir(damaged + '.damaged-0')  # kept for inspection, never deleted
  _assert_trees(_final_variables(workdir), reference)


def test_resume_with_another_model_is_refused_before_restoring(teacher, tmp_path):
  workdir = str(tmp_path / 'run')
  result = _train(teacher, workdir, '--config.total_steps=8')
  assert result.returncode == 0, result.stderr
  result = _train(teacher, workdir, '--config.toy.features=4')
  assert result.returncode == 1
  (line,) = [l for l in result.stderr.splitlines() if l.startswith('launch.train: error:')]
  assert 'checkpoints/8: the checkpoint holds another model' in line
  assert 'params/Conv_0/kernel (3, 3, 1, 8) -> (3, 3, 1, 4)' in line
  assert 'toy.features: 8 -> 4' in line and 'Traceback' not in result.stderr
  assert _steps(workdir) == [8]


def test_kill_during_save_keeps_previous_checkpoint(teacher, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  process = _start(teacher, workdir, script=HANG_IN_SECOND_SAVE)
  checkpoints = os.path.join(workdir, 'checkpoints')
  _wait_for(lambda: glob.glob(os.path.join(checkpoints, '16.orbax-checkpoint-tmp*')), process,
            workdir)
  _kill(process)
  assert _steps(workdir) == [8]  # 16 was never finalised
  result = _train(teacher, workdir)
  assert result.returncode == 0, result.stderr
  assert 'at step 8.' in result.stderr  # "Resumed from ... at step 8."
  _assert_trees(_final_variables(workdir), reference)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(teacher, tmp_path):
  workdir = str(tmp_path / 'run')
  result = _train(teacher, workdir, '--config.toy.nan_from_step=10')
  assert result.returncode == 1
  assert 'launch.train: error: Non-finite loss at step 10 (loss=nan' in result.stderr
  assert 'the last good checkpoint is step 8' in result.stderr
  assert _steps(workdir) == [8]
  assert os.listdir(os.path.join(workdir, 'best')) == []  # no evaluation of a bad state


def test_unknown_config_key_is_named(teacher, tmp_path):
  workdir = str(tmp_path / 'run')
  result = _train(teacher, workdir, '--config.nonexistent=1')
  assert result.returncode == 1
  assert ("launch.train: error: unknown config key 'nonexistent' in "
          "--config.nonexistent=1: config has no field 'nonexistent'. Keys of config: "
          'batch_size, best_metric,') in result.stderr
  result = _train(teacher, workdir, '--config.optim.lrr=0.1')
  assert result.returncode == 1
  assert "unknown config key 'optim.lrr'" in result.stderr
  assert 'Did you mean: optim.lr?' in result.stderr
  assert not os.path.exists(workdir)


def test_missing_data_fails_before_touching_workdir(teacher, tmp_path):
  workdir = str(tmp_path / 'run')
  missing = str(tmp_path / 'nowhere' / 'teacher.npz')
  result = _train(missing, workdir)
  assert result.returncode == 1
  assert f'launch.train: error: {missing}: toy data file not found (config.data_file)' in (
      result.stderr)
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(teacher, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  port = _free_port()
  processes = [
      subprocess.Popen(
          [sys.executable, '-m', 'launch.train', *_args(teacher, workdir),
           f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
          cwd=ROOT, env=_env(devices=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[1] for p in processes]
  for p, err in zip(processes, outputs):
    assert p.returncode == 0, err
  assert 'Process 0 of 2; 2 local / 4 global devices.' in outputs[0]
  assert 'step 24/24' in outputs[0] and 'step 24/24' not in outputs[1]  # logs on process 0 only
  data_dir = os.path.join(workdir, 'checkpoints', '24', 'data')
  assert sorted(f for f in os.listdir(data_dir) if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # 2 x 2 devices vs 8 devices: the same global batches row for row and the same dropout masks;
  # only the float32 summation order of the cross-device reductions differs (about 1e-7
  # absolute after 24 steps).
  _assert_trees(_final_variables(workdir), reference, rtol=1e-4, atol=1e-6)
