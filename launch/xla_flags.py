"""XLA flags that the entry points set by default, before a backend starts.

`apply_defaults()` is called at the start of every entry point's `main` (train, evaluate, predict,
convert, export, benchmark), never on import: importing the library changes nothing. Today it
appends one XLA:CPU flag under jax < 0.12: jaxlib 0.10 hands every convolution to YNNPACK, whose
kernels reach 210-260 GFLOP/s on DualTrack's 3D CNN layers on a 2-core AVX-512 machine, where
XLA's own reach 210-390 GFLOP/s (the 64-frame DualTrack sweep: 15.7 s -> 10.3 s; BENCHMARKS.md).
jaxlib 0.12's YNNPACK is the faster of the two there, so newer versions keep their default. A
user's own setting of the flag wins, and a backend that already started is unaffected. Library
users who want the same in their own programs call `apply_defaults()` before using jax.
"""
import os

import jax

_CPU_CONVOLUTIONS = '--xla_cpu_experimental_ynn_fusion_type'


def apply_defaults() -> None:
  """Appends the default flags that the user has not set to XLA_FLAGS."""
  flags = os.environ.get('XLA_FLAGS', '')
  if jax.__version_info__ < (0, 12) and _CPU_CONVOLUTIONS not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_CPU_CONVOLUTIONS}=-individual_convolution'.strip()
