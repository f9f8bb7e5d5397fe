"""Scenario 2: medical tasks (PubMedQA by default; ChemProt, RCT, MQP, USMLE).

  python main.py --config=configs/medical.py \
      --config.data.dir=../shared/data/medical --config.data.task=chemprot

Medical tasks have no synthetic fallback: `data.dir` must point to the files.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.medical_data(c, 'pubmedqa')
  c.data.max_length = 512
  c.data.length_buckets = (128, 256, 512)
  return c
