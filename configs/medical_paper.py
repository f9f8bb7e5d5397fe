"""Scenario 2 at the paper's settings (Qi et al. 2024, Sec. 4.1) on the
default model; see `configs/logs_paper.py` for the federated settings.

  python main.py --config=configs/medical_paper.py \
      --config.data.dir=../shared/data/medical --config.data.task=chemprot

`configs/medical.py` is this reduced for a 2-core CPU.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.medical_data(c, 'pubmedqa')
  c.model.name = 'smollm2-135m-instruct'
  c.data.max_length = 1024
  c.data.length_buckets = (256, 512, 1024)
  return c
