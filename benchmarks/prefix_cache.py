"""What running a shared prompt start once per adapter saves: option scoring
(evaluation) and AdaFusion's few-shot fitness, with and without the cached
prefix, on a config's real data and model.

  python benchmarks/prefix_cache.py --config=configs/logs.py \\
      --set data.dir=../shared/data/loghub

Every client gets its own random adapter (trained ones differ from the base
the same way). Each variant is called twice; the second call is the steady
time (the first includes compiling). Reports the shared prefix length, the
times, the largest score difference and whether every prediction agrees.
Writes ``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from zero_shot_eval import load_config

from fdlora_jax import data as data_lib
from fdlora_jax import evaluate as eval_lib
from fdlora_jax import fusion as fusion_lib
from fdlora_jax import lora as lora_lib
from fdlora_jax import model as model_lib
from fdlora_jax.model_loading import build_model


def timed(fn):
  t0 = time.time()
  out = jax.block_until_ready(fn())
  first = time.time() - t0
  t0 = time.time()
  jax.block_until_ready(fn())
  return out, first, time.time() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/logs.py')
  ap.add_argument('--set', action='append', default=[])
  ap.add_argument('--name', default='prefix_cache')
  ap.add_argument('--population', type=int, default=4)
  a = ap.parse_args()
  c = load_config(a.config, a.set)
  task = data_lib.load_task(c.data, c.seed)
  n = c.fl.num_clients
  part = data_lib.partition(task, n, c.data, c.seed)
  model, base, tokenizer, desc = build_model(c, task)
  tests = data_lib.encode_options(tokenizer, task, part.test, c.data)
  shots = data_lib.encode_clients(tokenizer, task, part.few_shot, c.data)
  keys = iter(jax.random.split(jax.random.key(c.seed), 256))
  one = lora_lib.init(model, next(keys))
  loras = lora_lib.stack([jax.tree.map(
      lambda x: 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), one)
      for _ in range(n)])
  arrays = {k: np.asarray(getattr(tests, k))
            for k in ('tokens', 'option_mask', 'attention_mask')}
  prefix = model_lib.shared_prefix_length(
      arrays['tokens'], arrays['option_mask'], arrays['attention_mask'])
  rows = int((arrays['option_mask'].sum((-1, -2)) > 0).sum())
  out = {**common.machine(), 'config': a.config, 'overrides': a.set,
         'model': desc, 'data_source': task.data_source,
         'is_synthetic': task.is_synthetic, 'clients': n,
         'test_examples': rows, 'length': int(arrays['tokens'].shape[-1]),
         'shared_prefix_tokens': prefix}
  print(f'{rows} test examples of {arrays["tokens"].shape[-1]} tokens, '
        f'shared prefix {prefix} tokens')
  score = {}
  for share in (False, True):
    s, first, steady = timed(lambda share=share: jnp.asarray(
        eval_lib.option_scores(model, base, loras, arrays,
                               chunk=c.eval.chunk, share_prefix=share)))
    score[share] = np.asarray(s)
    out[f'scoring_{"cached" if share else "whole"}_s'] = {
        'first': first, 'steady': steady}
    print(f'option scoring, prefix {"cached" if share else "not cached"}: '
          f'first {first:.1f} s, steady {steady:.1f} s')
  real = np.isfinite(score[False])
  out['scoring_max_abs_diff'] = float(
      np.abs(score[True][real] - score[False][real]).max())
  out['scoring_predictions_agree'] = bool(
      (score[True].argmax(-1) == score[False].argmax(-1)).all())

  few = {'tokens': shots.tokens, 'loss_mask': shots.loss_mask,
         'attention_mask': shots.attention_mask}
  w = jax.random.uniform(next(keys), (n, a.population, 2), minval=-1.0,
                         maxval=2.0)
  fit = {}
  for share in (False, True):
    fn = fusion_lib.make_fitness_fn(model, base, loras, loras, few, 0.05)
    if not share:   # the same function without the cached start
      fn = jax.tree_util.Partial(fn.func, *fn.args[:-1], None)
    f, first, steady = timed(lambda fn=fn: fn(w))
    fit[share] = np.asarray(f)
    out[f'fitness_{"cached" if share else "whole"}_s'] = {
        'first': first, 'steady': steady}
    print(f'fitness (population {a.population}), prefix '
          f'{"cached" if share else "not cached"}: first {first:.1f} s, '
          f'steady {steady:.1f} s')
  out['fitness_max_abs_diff'] = float(np.abs(fit[True] - fit[False]).max())
  print(f'max |diff|: scores {out["scoring_max_abs_diff"]:.2e}, fitness '
        f'{out["fitness_max_abs_diff"]:.2e}; predictions agree: '
        f'{out["scoring_predictions_agree"]}')
  common.write_json(a.name, out)


if __name__ == '__main__':
  main()
