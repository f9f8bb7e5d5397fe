"""Runs an FDLoRA experiment.

  python main.py --config=configs/logs.py --workdir=runs/logs \
      --config.fl.rounds=10 --config.data.dirichlet_alpha=0.1

Running again with the same --workdir resumes from the newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fdlora_jax import run

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/logs.py', 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default',
                               'Where checkpoints, metrics and results go.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
