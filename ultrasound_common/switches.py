"""A model's computation switches from `KEY=VALUE` texts (`launch.benchmark --model_options`).

A switch is a model attribute that selects how the same function of the same parameters is
computed (docs/performance.md): which attention kernel, which convolution form, BatchNorm folded
or not. Each package lists its switches and their values; `parse` checks texts against them.
"""
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ultrasound_common import errors

_BOOLEANS = {'true': True, 'false': False}


def parse(texts: Iterable[str], choices: Mapping[str, Sequence[Any]],
          flag: str = '--model_options') -> dict[str, Any]:
  """{key: value} of 'key=value' texts; each key one of `choices`, each value one of its values.

  Boolean switches (choices (False, True)) take 'true' or 'false'; the others their strings.
  """
  out = {}
  for text in texts:
    key, sep, value = text.partition('=')
    key, value = key.strip(), value.strip()
    if not sep or key not in choices:
      raise errors.InputError(f'{flag}: {text!r} is not KEY=VALUE with KEY one of '
                              f'{", ".join(choices)}')
    allowed = choices[key]
    parsed = _BOOLEANS.get(value.lower(), value) if isinstance(allowed[0], bool) else value
    if parsed not in allowed or type(parsed) is not type(allowed[0]):
      shown = [str(v).lower() if isinstance(v, bool) else v for v in allowed]
      raise errors.InputError(f'{flag}: {key}={value!r} is not one of {", ".join(shown)}')
    out[key] = parsed
  return out


def describe(settings: Mapping[str, Any]) -> str:
  """', key=value, ...' for a case label; '' for none."""
  return ''.join(f', {k}={str(v).lower() if isinstance(v, bool) else v}'
                 for k, v in settings.items())
