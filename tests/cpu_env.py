"""The XLA flags of every test process: this one (conftest.py) and the commands that tests start.

Tests compile hundreds of tiny programs and run each once or twice, so compiling dominates the
suite. LLVM's -O0 (`--xla_backend_optimization_level=0`) keeps every XLA optimisation of the
program and skips only the machine-code optimisation: XLA:CPU compiles about 2.4x faster and the
tiny programs run as fast (tests/test_local_stage1.py: 34.5 s of compiling -> 14.2 s, 49 -> 28 s
in all). The entry points themselves keep full optimisation (launch/xla_flags.py).
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process that simulates `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'
