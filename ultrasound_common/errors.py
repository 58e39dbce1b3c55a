"""The project's errors, and how every command reports them.

An `Error` is something the user can fix: a missing or malformed file, a bad config value, a flag
that does not fit. Each one is a subclass that also derives from the built-in class it refines
(`ValueError`, `FileNotFoundError`, ...), so library callers can catch either. Its message names
what is wrong (the file and the key or field, the flag) and, where there is one, the fix.

`run(main, command)` runs a program's `main` under absl: one of the project's errors, a usage
error ends as one line on stderr, `<command>: error: <message>`, with exit status 1 (or the
error's `exit_code`, e.g. 143 after SIGTERM); `--traceback` shows the Python traceback instead,
for a bug report. Every other exception is a bug and keeps its traceback.
"""
from collections.abc import Callable
import sys

from absl import app
from absl import flags


class Error(Exception):
  """Bad input, config or environment: commands report it as one line."""


class InputError(Error, ValueError):
  """A value (file content, config key, flag) is wrong; the message names it."""


class MissingFileError(Error, FileNotFoundError):
  """A file or folder that was named does not exist."""


class ExistsError(Error, FileExistsError):
  """An output would overwrite something that exists."""


class MissingPackageError(Error, ImportError):
  """An optional package that a feature needs is not installed; the message says how to."""


def _report(command: str, error) -> None:
  message = ' '.join(str(error).split('\n'))
  sys.stderr.write(f'{command}: error: {message}\n')


def run(main: Callable[[list[str]], None], command: str,
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """`app.run(main)` with the project's error policy (module docstring).

  Args:
    main: the program, given the arguments left after flag parsing.
    command: its name in messages, e.g. 'launch.train'.
    flags_parser: absl's `flags_parser` argument (e.g. clear errors for unknown config keys).
  """
  if 'traceback' not in flags.FLAGS:
    flags.DEFINE_bool('traceback', False, 'Show the Python traceback of an error (bug reports).')

  def checked(argv: list[str]) -> None:
    try:
      main(argv)
    except (Error, app.UsageError) as e:
      if flags.FLAGS.traceback:
        raise
      _report(command, e)
      sys.exit(getattr(e, 'exit_code', 1))
    except KeyboardInterrupt:
      if flags.FLAGS.traceback:
        raise
      _report(command, 'interrupted (Ctrl-C)')
      sys.exit(130)

  def parse(argv: list[str]) -> list[str]:
    try:
      return (flags_parser or flags.FLAGS)(argv)
    except (Error, flags.Error) as e:  # A flag absl refuses, or one the project checks itself.
      _report(command, e)
      sys.exit(1)

  app.run(checked, flags_parser=parse)
