"""Process-wide JAX settings of the command-line entry points (``main.py``,
the Flower apps), made before the first computation.

The persistent compilation cache: XLA's compiled programs are kept on disk,
keyed by the program, the devices, jax's version and the XLA flags, so a
second run of the same shapes loads them instead of compiling. On the CPU
the tiny config compiles about 140 programs, most of them small, so every
program is kept, however fast it compiled. A cached program is the very
executable the compiler made: outputs are the same, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax

DEFAULT_CACHE = '~/.cache/fdlora_jax/jax'


def use_compilation_cache(directory: Optional[str]) -> Optional[Path]:
  """Turns on the persistent compilation cache under ``directory`` ('' or
  None: off); returns the directory in use. ``JAX_COMPILATION_CACHE_DIR``
  in the environment, when set, wins: JAX reads it itself."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    path = Path(os.environ['JAX_COMPILATION_CACHE_DIR'])
  elif directory:
    path = Path(directory).expanduser()
    jax.config.update('jax_compilation_cache_dir', str(path))
  else:
    return None
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return path
