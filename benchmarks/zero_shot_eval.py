"""Zero-shot and majority-class baselines of a config, without padding waste.

  python benchmarks/zero_shot_eval.py --config=configs/logs.py \\
      --set data.dir=../shared/data/loghub --set data.chat_template=on

The same numbers as ``main.py --config.method=zero_shot`` (same data, same
partition, same tokens, same option scoring with ``evaluate.option_scores``),
computed faster: ``run.evaluate`` scores an ``[N, M]`` grid (every client
padded to the largest test split, every prompt padded to the longest one),
which on a skewed Dirichlet partition of the real LogHub samples is ~3x the
real work. Here only the real test examples are scored, sorted by length, in
chunks whose length is the bucket of their longest prompt.

Also reports the majority-class guess: each client always predicts the most
frequent label of its own training split (the ``--config.method=local``
baseline with no model), scored on its test split with the same metric.

Writes ``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import resource
import time

import common
import numpy as np

from fdlora_jax import data as data_lib
from fdlora_jax import evaluate as eval_lib
from fdlora_jax.model_loading import build_model


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location('exp_config',
                                                common.REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for item in overrides:
    key, value = item.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    target, parts = c, key.split('.')
    for p in parts[:-1]:
      target = target[p]
    target[parts[-1]] = value
  return c


def majority_metrics(task, part) -> dict:
  labels = task.labels()
  golds = [labels[np.asarray(t, np.int64)] for t in part.test]
  m = max(max(len(g) for g in golds), 1)
  g = np.zeros((len(golds), m), np.int32)
  v = np.zeros((len(golds), m), bool)
  for i, gi in enumerate(golds):
    g[i, :len(gi)], v[i, :len(gi)] = gi, True
  positive = task.options.index('yes') if task.metric == 'f1' else None
  return eval_lib.majority_guess(data_lib.label_counts(task, part.train),
                                 g, v, task.metric, positive)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/logs.py')
  ap.add_argument('--set', action='append', default=[],
                  help='a config override, e.g. data.max_length=512')
  ap.add_argument('--chunk', type=int, default=16)
  ap.add_argument('--buckets', default='128,256,384,512,768,1024')
  ap.add_argument('--name', default='zero_shot_eval')
  ap.add_argument('--no-model', action='store_true',
                  help='only the majority-class guess')
  a = ap.parse_args()
  c = load_config(a.config, a.set)
  t_start = time.time()
  task = data_lib.load_task(c.data, c.seed)
  part = data_lib.partition(task, c.fl.num_clients, c.data, c.seed)
  positive = task.options.index('yes') if task.metric == 'f1' else None
  out = {**common.machine(), 'config': a.config, 'overrides': a.set,
         'data_source': task.data_source, 'is_synthetic': task.is_synthetic,
         'task': task.name, 'metric': task.metric,
         'test_sizes': [len(t) for t in part.test],
         'majority': majority_metrics(task, part)}
  print(part.table(task))
  print('majority-class guess:', {k: round(v, 4) for k, v in
                                  out['majority']['mean'].items()
                                  if k != 'n'})
  if not a.no_model:
    t0 = time.time()
    model, base, tokenizer, desc = build_model(c, task)
    tests = data_lib.encode_options(tokenizer, task, part.test, c.data)
    t_data = time.time() - t0
    valid = np.asarray(tests.valid)
    rows = np.argwhere(valid)                         # (client, row) pairs
    lengths = np.asarray(tests.attention_mask)[valid].sum(-1).max(-1)
    order = np.argsort(lengths, kind='stable')
    buckets = sorted(int(b) for b in a.buckets.split(','))
    scores = np.zeros(valid.shape + (len(task.options),), np.float32)
    t0 = time.time()
    for s in range(0, len(order), a.chunk):
      pick = order[s:s + a.chunk]
      longest = int(lengths[pick].max())
      size = next((b for b in buckets if b >= longest),
                  tests.tokens.shape[-1])
      ci, ri = rows[pick, 0], rows[pick, 1]
      sub = {k: np.asarray(getattr(tests, k))[ci, ri][None, ..., :size]
             for k in ('tokens', 'option_mask', 'attention_mask')}
      pad = a.chunk - len(pick)       # one shape per bucket: pad the chunk
      if pad:
        sub = {k: np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
               for k, x in sub.items()}
      got = eval_lib.option_scores(model, base, None, sub, chunk=a.chunk,
                                   normalize=c.eval.normalize)
      scores[ci, ri] = got[0, :len(pick)]
    t_eval = time.time() - t0
    preds = scores.argmax(-1)
    out['zero_shot'] = eval_lib.classification_metrics(
        preds, tests.labels, valid, task.metric, positive)
    out['model'] = desc
    out['truncated'] = int(tests.truncated)
    out['predicted_positive_fraction'] = (
        float((preds[valid] == positive).mean()) if positive is not None
        else None)
    out['timing'] = {'data_and_model_s': t_data, 'eval_s': t_eval}
    print('zero-shot:', {k: round(v, 4) for k, v in
                         out['zero_shot']['mean'].items() if k != 'n'},
          f'(eval {t_eval:.0f} s, {len(order)} examples, {tests.truncated} '
          f'truncated)')
  out['wall_s'] = time.time() - t_start
  out['peak_rss_mib'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  with open('/proc/loadavg') as f:
    out['loadavg_end'] = f.read().strip()
  common.write_json(a.name, out)


if __name__ == '__main__':
  main()
