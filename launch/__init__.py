"""Entry points (train, evaluate, predict, convert, benchmark) and the runtime they share.

Importing the package appends one XLA:CPU flag to XLA_FLAGS under jax < 0.12, before a backend
starts: jaxlib 0.10 hands every convolution to YNNPACK, whose kernels reach 210-260 GFLOP/s on
DualTrack's 3D CNN layers on a 2-core AVX-512 machine, where XLA's own reach 210-390 GFLOP/s
(the 64-frame DualTrack sweep: 15.7 s -> 10.3 s; BENCHMARKS.md). jaxlib 0.12's YNNPACK is the
faster of the two there, so newer versions keep their default. A user's own setting of the flag
wins, and a backend that already started is unaffected.
"""
import os

import jax

_FLAG = '--xla_cpu_experimental_ynn_fusion_type'

if jax.__version_info__ < (0, 12) and _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=-individual_convolution"
