"""Scenario 1: log anomaly detection (LogHub BGL, Spirit, Thunderbird).

  python main.py --config=configs/logs.py --workdir=/tmp/fdlora_logs
  python main.py --config=configs/logs.py --config.data.dir=../shared/data/loghub

Without `data.dir` the built-in synthetic log generator is used (and every
output says so). Paper settings come from configs/common.py.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.logs_data(c)
  # The embedded tiny model learns from random weights, so every projection
  # gets an adapter there; with a real checkpoint the paper's q/v suffice.
  c.lora.targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                    'up_proj', 'down_proj')
  return c
