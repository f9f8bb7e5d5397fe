"""AdaFusion: population in one vmapped pass vs one candidate at a time.

  python benchmarks/fusion_speed.py                    # ~2 min on 2 cores

Equal numbers of fitness evaluations (N clients x P candidates x S steps, the
defaults of ``fusion.fusion_config()``: P = 8, S = 5; N = 5) three ways:

  vmapped_fitness  S calls of ``fusion.make_fitness_fn``'s ``f(w [N, P, 2])``
                   (clients x population in one jitted vmap).
  vmapped_search   ``fusion.make_adafusion`` (evosax CMA-ES ask/tell and the
                   fitness in one ``jit`` under ``lax.scan``; it also
                   evaluates the N start points: N*(P*S + 1) evaluations).
  loop             LoraHub's nevergrad shape: a Python loop that proposes one
                   candidate (numpy), calls a jitted single-candidate loss
                   (``fuse`` + ``fewshot_loss`` + lam |w|_1 for one client)
                   and reads the float back, N*P*S times.

Runs alternate; medians of ``--repeats``. Writes
``benchmarks/results/fusion_speed.json``.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax import fusion
from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params, num_targets_bucket


def setup(preset, n, shots, length, targets):
  cfg = PRESETS[preset]
  model = Llama(cfg, LoraConfig(rank=8, alpha=16.0, targets=targets))
  base = init_params(cfg, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 2 * n)

  def adapter(k):   # non-zero b, so the fused adapters differ
    tree = lora_lib.init(model, k)
    return jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.fold_in(k, x.size),
                                               x.shape), tree)
  personal = lora_lib.stack([adapter(k) for k in keys[:n]])
  global_ = lora_lib.stack([adapter(k) for k in keys[n:]])
  rng = np.random.default_rng(0)
  fewshot = {
      'tokens': rng.integers(0, cfg.vocab_size, (n, shots, length)
                             ).astype(np.int32),
      'loss_mask': np.zeros((n, shots, length), np.float32),
      'attention_mask': np.ones((n, shots, length), np.int32)}
  fewshot['loss_mask'][..., -4:] = 1.0                # the answer tokens
  return model, base, personal, global_, fewshot


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--presets', default='tiny,small')
  p.add_argument('--clients', type=int, default=5)
  p.add_argument('--population', type=int, default=8)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--shots', type=int, default=5)       # data.few_shot
  p.add_argument('--length', type=int, default=128)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--targets', default=','.join(common.ALL_TARGETS))
  p.add_argument('--out', default=None)
  a = p.parse_args()
  n, pop, steps = a.clients, a.population, a.steps
  evals = n * pop * steps
  rows = []
  for preset in a.presets.split(','):
    model, base, personal, global_, fewshot = setup(
        preset, n, a.shots, a.length, tuple(a.targets.split(',')))
    fitness = fusion.make_fitness_fn(model, base, personal, global_, fewshot,
                                     lam=0.05)
    cfg = fusion.fusion_config()
    cfg.population_size, cfg.steps = pop, steps
    search = fusion.make_adafusion(n, cfg)
    key = jax.random.key(0)
    search_c = search.lower(fitness, key).compile()
    w_all = jnp.asarray(np.clip(np.random.default_rng(1).normal(
        0.5, 0.3, (steps, n, pop, 2)), -1.5, 1.5), jnp.float32)

    shots = [{k: jnp.asarray(v[i]) for k, v in fewshot.items()}
             for i in range(n)]
    per_p = lora_lib.unstack(personal)
    per_g = lora_lib.unstack(global_)

    # The same per-evaluation work as the vmapped pass (logits only at the
    # answer positions), so the comparison isolates batching.
    num_targets = num_targets_bucket(fewshot['loss_mask'])

    @jax.jit
    def single(base, p_i, g_i, shots_i, w):              # w [2]
      lora = fusion.fuse(p_i, g_i, w)
      ce = fusion.fewshot_loss(model, base, lora, shots_i['tokens'],
                               shots_i['loss_mask'],
                               shots_i['attention_mask'], num_targets)
      return ce + 0.05 * jnp.abs(w).sum()

    def run_vmapped_fitness():
      for s in range(steps):
        f = fitness(w_all[s])
      jax.block_until_ready(f)

    def run_vmapped_search():
      jax.block_until_ready(search_c(fitness, key))

    def run_loop():
      rng = np.random.default_rng(1)
      best = np.full(n, np.inf)
      for s in range(steps):
        for i in range(n):
          for j in range(pop):
            w = np.clip(rng.normal(0.5, 0.3, 2), -1.5, 1.5).astype(np.float32)
            best[i] = min(best[i], float(single(base, per_p[i], per_g[i],
                                                shots[i], w)))
      return best

    # Same values: the loop's candidates are those of w_all.
    f_vm = np.asarray(fitness(w_all[0]))
    f_one = float(single(base, per_p[0], per_g[0], shots[0], w_all[0, 0, 0]))
    assert abs(f_vm[0, 0] - f_one) < 1e-4, (f_vm[0, 0], f_one)

    runs = {'vmapped_fitness': run_vmapped_fitness,
            'vmapped_search': run_vmapped_search, 'loop': run_loop}
    for fn in runs.values():
      fn()                                                # warm-up
    times = {k: [] for k in runs}
    order = list(runs)
    for rep in range(a.repeats):
      shift = rep % len(order)
      for name in order[shift:] + order[:shift]:
        t0 = time.perf_counter()
        runs[name]()
        times[name].append(time.perf_counter() - t0)
    med = {k: common.median(v) for k, v in times.items()}
    row = {'preset': preset, 'clients': n, 'population': pop, 'steps': steps,
           'evaluations': evals, 'tokens_per_eval': a.shots * a.length,
           'vmapped_fitness_s': med['vmapped_fitness'],
           'vmapped_search_s': med['vmapped_search'],
           'loop_s': med['loop'],
           'loop/vmapped_fitness': med['loop'] / med['vmapped_fitness'],
           'loop/vmapped_search': med['loop'] / med['vmapped_search'],
           'loop_ms_per_eval': 1e3 * med['loop'] / evals,
           'times_s': {k: [round(x, 4) for x in v] for k, v in times.items()}}
    rows.append(row)
  cols = [c for c in rows[0] if c != 'times_s']
  common.print_table(rows, cols)
  common.write_json('fusion_speed', {
      **common.machine(), 'args': vars(a), 'rows': rows,
      'notes': 'vmapped_search also evaluates the N start points '
               '(N*(P*S+1) evaluations) and runs CMA-ES; the loop draws '
               'random candidates (no ES cost).'}, a.out)


if __name__ == '__main__':
  main()
