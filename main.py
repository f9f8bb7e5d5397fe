"""Runs one federated experiment.

  python main.py --config=configs/logs.py --workdir=runs/logs \\
      --config.method=fdlora --config.fl.rounds=10 \\
      --config.data.dirichlet_alpha=0.1

Methods: fdlora_jax.fl.methods.METHODS (--config.method=...). Running again
with the same --workdir resumes from the newest checkpoint (saved at most
every --checkpoint_every seconds, and after each phase). Bad input (a
config value, a missing or malformed file) is reported in one line, naming
the field or file, with exit status 2. Library logs are off below WARNING;
--verbosity=0 brings back INFO. Compiled programs are kept in
~/.cache/fdlora_jax/jax (--compilation_cache='' turns that off), so a second
run of the same shapes starts faster.

Several processes (jax.distributed; docs/usage.md, "Several processes"):
every process runs the same command with --coordinator=HOST:PORT
--num_processes=P --process_id=I (or --distributed on a cluster JAX
detects); the clients are split over all their devices, and process 0
writes the outputs.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fdlora_jax import run, runtime, sharding
from fdlora_jax.errors import (config_override_errors, exit_on_user_error,
                               parse_flags)

_DEFAULT_CONFIG = 'configs/logs.py'
# Without --config on the command line, ml_collections applies the
# --config.* overrides here, when the flag is defined.
with config_override_errors('config', _DEFAULT_CONFIG):
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default',
                               'Where checkpoints, metrics and results go.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Run as one of several processes (jax.distributed): the clients are '
    'split over every process\'s devices. On a cluster JAX finds the '
    'coordinator itself; else give --coordinator, --num_processes and '
    '--process_id. Every process takes the same flags and --workdir.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'jax.distributed: host:port of process 0 '
    '(implies --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'jax.distributed: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'jax.distributed: this process, from 0.')
_CACHE = flags.DEFINE_string(
    'compilation_cache', runtime.DEFAULT_CACHE,
    'Directory of the persistent compilation cache: a second run of the '
    'same shapes loads its compiled programs instead of compiling them. '
    "'' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins.")
_CHECKPOINT_EVERY = flags.DEFINE_float(
    'checkpoint_every', 60.0,
    'Seconds between run-state checkpoints at least (and after the last '
    'round of each phase); 0: after every round. A killed run resumes from '
    'the last one to the same results.')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300,
    'jax.distributed: seconds to wait for every process to join.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax, data INFO: --verbosity=0
  runtime.use_compilation_cache(_CACHE.value)
  with exit_on_user_error():
    if _DISTRIBUTED.value or _COORDINATOR.value is not None:
      sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value, _TIMEOUT.value)
      if jax.process_index() > 0:    # the first process prints and writes
        sys.stdout = open(os.devnull, 'w')
    run.run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT_EVERY.value)


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'config',
                                                      _DEFAULT_CONFIG))
