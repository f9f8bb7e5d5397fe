"""The embedded tiny model on the built-in synthetic logs: the tests' and
smoke runs' base config (seconds per run on a CPU, nothing to install).

  python main.py --config=configs/tiny.py

A 2-layer, 64-wide LLaMA with random weights and a tokenizer trained on the
task's own text: it shows the code path, not what FDLoRA can do (for that,
configs/logs.py runs the pretrained default model). The paper's settings
come from configs/common.py.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.logs_data(c)
  c.model.name = ''           # the tiny random-weight preset
  # Random weights learn little through q/v alone, so every projection gets
  # an adapter here; with a pretrained model the paper's q/v suffice.
  c.lora.targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                    'up_proj', 'down_proj')
  return c
