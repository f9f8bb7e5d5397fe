"""Scenario 1 at the paper's settings (Qi et al. 2024, Sec. 4.1) on the
default model: N = 5, T = 30, K = 3, batch 1, 50-line windows, one local
epoch, inner AdamW lr 2e-4, outer Nesterov lr 1e-3 momentum 0.5, AdaFusion
with population 8 for 5 steps, the global adapter evaluated every 5 rounds.

  python main.py --config=configs/logs_paper.py \
      --config.data.dir=../shared/data/loghub

Hours of accelerator time; `configs/logs.py` is this reduced for a 2-core
CPU (each reduction marked there). The values are configs/common.py's.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.logs_data(c)
  c.model.name = 'smollm2-135m-instruct'
  c.data.max_length = 2048    # a 50-line window is ~1,000-3,000 tokens
  c.data.length_buckets = (256, 512, 1024, 2048)
  return c
