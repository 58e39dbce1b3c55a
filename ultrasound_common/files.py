"""Writing files so that a crash never leaves a partial file where a complete one is expected."""
from collections.abc import Iterator
import contextlib
import json
import os
from typing import Any
import uuid


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path next to `path` and moves it onto `path` if the block succeeds.

  The temporary file is in the same folder (so os.replace is an atomic rename) and is fsync'ed
  before the rename, so a crash never leaves a file at `path` that looks complete but is not.
  The folder must exist. If the block raises, `path` is untouched and the temporary file removed.
  """
  path = os.fspath(path)
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    yield tmp
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_output(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def write_json(path: str | os.PathLike, content: Any, **dump_options) -> None:
  """Writes `content` as JSON, with a final newline, to `path` atomically."""
  write_text(path, json.dumps(content, **dump_options) + '\n')
