"""Can the model learn the task at all? One adapter trained centrally.

  python benchmarks/central_probe.py --config=configs/logs.py \\
      --set data.dir=../shared/data/loghub --steps=64 --every=16

Pools the whole task into one client (``fl.num_clients=1``: the config's
data, balance and 8:2 split), trains one adapter with AdamW at batch
``--batch`` on the SFT loss the methods use (``step.Forward.nll``), and
scores the test split every ``--every`` steps with the option scoring of a
run (``evaluate.option_scores``). Per evaluation it prints F1, accuracy, the
share of "yes" answers and the AUC of ``score(yes) - score(no)``: a ranking
that improves while the share of "yes" swings between 0 and 1 is an
adapter that learns the examples but whose answer follows the last few
labels it saw. No federation, no fusion: the ceiling a federated run of the
same steps can hope for, and a quick check of a workload (a few minutes).

Writes ``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import numpy as np
import optax

from fdlora_jax import data as data_lib
from fdlora_jax import evaluate as eval_lib
from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.step import Forward
from fdlora_jax.model_loading import build_model
from zero_shot_eval import load_config


def auc(diff: np.ndarray, labels: np.ndarray) -> float:
  """P(diff of a positive > diff of a negative), ties counted half."""
  pos, neg = diff[labels == 1], diff[labels == 0]
  if not len(pos) or not len(neg):
    return float('nan')
  greater = (pos[:, None] > neg[None]).mean()
  return float(greater + 0.5 * (pos[:, None] == neg[None]).mean())


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/logs.py')
  ap.add_argument('--set', action='append', default=[],
                  help='config override, e.g. data.window_size=3')
  ap.add_argument('--steps', type=int, default=64)
  ap.add_argument('--every', type=int, default=16)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--lr', type=float, default=None,
                  help='default: the config\'s fl.inner_lr')
  ap.add_argument('--name', default='central_probe')
  a = ap.parse_args()
  c = load_config(a.config, a.set)
  lr = a.lr or c.fl.inner_lr
  task = data_lib.load_task(c.data, c.seed)
  part = data_lib.partition(task, 1, c.data, c.seed)
  model, base, tokenizer, described = build_model(c, task)
  train = data_lib.encode_clients(tokenizer, task, part.train, c.data)
  tests = data_lib.encode_options(tokenizer, task, part.test, c.data)
  positive = task.options.index('yes') if task.metric == 'f1' else None
  opt = optax.adamw(lr, c.fl.inner_b1, c.fl.inner_b2,
                    weight_decay=c.fl.inner_weight_decay)
  lora = lora_lib.init(model, jax.random.key(c.seed + 1))
  state = opt.init(lora)

  @jax.jit
  def step(base, lora, state, batch, rng):
    fwd = Forward(model, base, None, c.fl.dropout)
    (loss, _), grads = jax.value_and_grad(fwd.nll, has_aux=True)(
        lora, batch, rng)
    updates, state = opt.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, loss

  valid = np.asarray(tests.valid)[0]
  labels = np.asarray(tests.labels)[0][valid]

  def evaluate(lora):
    scores = eval_lib.option_scores(model, base, lora_lib.replicate(lora, 1),
                                    tests, chunk=c.eval.chunk)
    preds = scores.argmax(-1)
    m = eval_lib.classification_metrics(preds, tests.labels, tests.valid,
                                        task.metric, positive)['mean']
    out = {'accuracy': m['accuracy'], task.metric: m[task.metric]}
    if positive is not None:
      diff = (scores[0, :, positive] - scores[0, :, 1 - positive])[valid]
      out.update(said_yes=float((preds[0][valid] == positive).mean()),
                 auc=auc(diff, labels))
    return out

  count = int(train.counts[0])
  rng = np.random.default_rng(c.seed)
  order = np.concatenate([rng.permutation(count)
                          for _ in range(a.steps * a.batch // count + 1)])
  arrays = {'tokens': train.tokens[0], 'loss_mask': train.loss_mask[0],
            'attention_mask': train.attention_mask[0]}
  print(f'{task.data_source}\nmodel: {described}\ntrain {count}, test '
        f'{int(valid.sum())}; lr {lr}, batch {a.batch}, {a.steps} steps')
  rows, losses, t0 = [], [], time.perf_counter()
  for s in range(a.steps):
    rows_ix = order[s * a.batch:(s + 1) * a.batch]
    batch = {k: v[rows_ix] for k, v in arrays.items()}  # one shape: [B, L]
    lora, state, loss = step(base, lora, state, batch, jax.random.key(s))
    losses.append(float(loss))
    if (s + 1) % a.every == 0 or s + 1 == a.steps:
      row = {'step': s + 1, 'loss': float(np.mean(losses[-a.every:])),
             **evaluate(lora), 'elapsed_s': time.perf_counter() - t0}
      rows.append(row)
      print('  '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}'
                      for k, v in row.items()), flush=True)
  common.write_json(a.name, {
      **common.machine(), 'config': a.config, 'overrides': a.set,
      'data_source': task.data_source, 'model': described, 'seed': c.seed,
      'lr': lr, 'batch': a.batch, 'steps': a.steps, 'train': count,
      'test': int(valid.sum()), 'rows': rows})


if __name__ == '__main__':
  main()
