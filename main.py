"""Runs one federated experiment.

  python main.py --config=configs/logs.py --workdir=runs/logs \\
      --config.method=fdlora --config.fl.rounds=10 \\
      --config.data.dirichlet_alpha=0.1

Methods: fdlora_jax.fl.methods.METHODS (--config.method=...). Running again
with the same --workdir resumes from the newest checkpoint. Bad input (a
config value, a missing or malformed file) is reported in one line, naming
the field or file, with exit status 2. Library logs are off below WARNING;
--verbosity=0 brings back INFO.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fdlora_jax import run
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax, data INFO: --verbosity=0
  with exit_on_user_error():
    run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'config',
                                                      _DEFAULT_CONFIG))
