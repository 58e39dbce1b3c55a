"""ultrasound_common.files: a failed write leaves the old file and no temporary file behind."""
import json
import os

import pytest

from ultrasound_common import files


def test_write_json_replaces_the_file(tmp_path):
  path = tmp_path / 'a.json'
  files.write_json(path, {'x': 1})
  files.write_json(path, {'x': 2}, indent=2)
  assert json.loads(path.read_text()) == {'x': 2}
  assert os.listdir(tmp_path) == ['a.json']


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / 'a.txt'
  files.write_text(path, 'complete')
  with pytest.raises(RuntimeError, match='crash'):
    with files.atomic_output(path) as tmp, open(tmp, 'w') as f:
      f.write('partial')
      raise RuntimeError('crash')
  assert path.read_text() == 'complete'
  assert os.listdir(tmp_path) == ['a.txt']
