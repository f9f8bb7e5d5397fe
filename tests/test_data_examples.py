"""Examples and prompts (fdlora_jax/data/examples.py)."""

from fdlora_jax import data
from tests.helpers import logs_cfg


def test_log_prompt_template():
  example = data.Example('a\nb', ('no', 'yes'), 1, 'BGL', ('a', 'b'))
  assert data.build_prompt(example, logs_cfg().template, logs_cfg()) == (
      'Below is a system log question and relevant logs are provided. Write '
      'a response that appropriately answer the question. Let us think step '
      'by step, just output the final answer.\n\n### Is there an anomaly in '
      'the following system logs? Answer yes or no.\na\nb\n\n### Response:')
