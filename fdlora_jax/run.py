"""One FDLoRA experiment from a config: data, model, three stages, outputs.

``main.py`` calls :func:`run`; tests call it too with tiny configs. Running it
again on the same workdir resumes from the newest round checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from fdlora_jax import data as data_lib
from fdlora_jax import evaluate as eval_lib
from fdlora_jax import fusion as fusion_lib
from fdlora_jax import io as io_lib
from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.checkpoint import load_pretrained
from fdlora_jax.fl import FDLoRA
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, PROJECTIONS, Llama, init_params
from fdlora_jax.tokenizer import embedded_tokenizer, load_tokenizer


# ---------------------------------------------------------------------------
# Config validation: before any compute, naming the field
# ---------------------------------------------------------------------------
def validate_config(c: ml_collections.ConfigDict) -> None:
  def need(ok, field, value, what):
    if not ok:
      raise ValueError(f'config.{field}={value!r}: {what}')

  fl = c.fl
  need(fl.num_clients >= 1, 'fl.num_clients', fl.num_clients, 'must be >= 1')
  need(fl.inner_steps >= 1, 'fl.inner_steps', fl.inner_steps,
       'K must be >= 1')
  need(fl.rounds >= 0, 'fl.rounds', fl.rounds, 'must be >= 0')
  need(fl.sync_every >= 1, 'fl.sync_every', fl.sync_every,
       'H must be >= 1 (inf: never)')
  need(fl.batch_size >= 1, 'fl.batch_size', fl.batch_size, 'must be >= 1')
  need(fl.local_epochs >= 0, 'fl.local_epochs', fl.local_epochs,
       'must be >= 0')
  need(fl.inner_unit in ('steps', 'epochs'), 'fl.inner_unit', fl.inner_unit,
       "must be 'steps' or 'epochs'")
  need(fl.weighting in ('uniform', 'examples'), 'fl.weighting', fl.weighting,
       "must be 'uniform' or 'examples'")
  need(fl.inner_lr > 0, 'fl.inner_lr', fl.inner_lr, 'must be > 0')
  need(fl.outer_lr > 0, 'fl.outer_lr', fl.outer_lr, 'must be > 0')
  need(0 <= fl.outer_momentum < 1, 'fl.outer_momentum', fl.outer_momentum,
       'must be in [0, 1)')
  need(c.data.dirichlet_alpha > 0, 'data.dirichlet_alpha',
       c.data.dirichlet_alpha, 'the Dirichlet alpha must be > 0')
  need(c.lora.rank > 0, 'lora.rank', c.lora.rank, 'must be > 0')
  need(c.lora.alpha > 0, 'lora.alpha', c.lora.alpha, 'must be > 0')
  bad = [t for t in c.lora.targets if t not in PROJECTIONS]
  need(not bad, 'lora.targets', tuple(c.lora.targets),
       f'{bad} are not projections of a LLaMA model; choose from '
       f'{PROJECTIONS}')
  need(c.model.checkpoint or c.model.preset in PRESETS, 'model.preset',
       c.model.preset, f'unknown; choose from {sorted(PRESETS)}')
  need(c.eval.every >= 0, 'eval.every', c.eval.every, 'must be >= 0')
  need(c.eval.mode in ('score', 'generate'), 'eval.mode', c.eval.mode,
       "must be 'score' (option log-likelihood) or 'generate' (greedy)")
  fusion_lib.validate_config(c.fusion)
  for kind in c.fusion.baselines:
    need(kind in fusion_lib.BASELINES, 'fusion.baselines', kind,
         f'choose from {fusion_lib.BASELINES}')


# Fields a resumed run may change: they do not shape the saved state.
RESUMABLE_CHANGES = ('fl.rounds', 'eval.', 'fusion.')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_resumable(saved_path: Path, c: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir under a config that changes its state."""
  if not saved_path.is_file():
    raise ValueError(f'{saved_path.parent} has checkpoints but no '
                     f'config.json; cannot check it is the same experiment')
  saved = _flatten(json.loads(saved_path.read_text()))
  now = _flatten(json.loads(c.to_json_best_effort()))
  changed = sorted(k for k in set(saved) | set(now)
                   if saved.get(k) != now.get(k)
                   and not k.startswith(RESUMABLE_CHANGES))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}'
                        for k in changed[:6])
    raise ValueError(
        f'{saved_path.parent} holds a run with a different config ({details}'
        f'{" ..." if len(changed) > 6 else ""}); use a new --workdir, or '
        f'change only {", ".join(RESUMABLE_CHANGES)} when resuming')


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------
def build_model(c, task):
  """(model, base params, tokenizer, model description)."""
  execution = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                   remat=c.model.remat, attention=c.model.attention)
  lcfg = LoraConfig.from_config(c.lora)
  if c.model.checkpoint:
    path = Path(c.model.checkpoint).expanduser()
    tokenizer = load_tokenizer(str(path))
    cfg, base = load_pretrained(path, **execution)
    if len(tokenizer) > cfg.vocab_size:
      raise ValueError(f'{path}: tokenizer has {len(tokenizer)} tokens but '
                       f'config.json vocab_size is {cfg.vocab_size}')
    described = f'checkpoint {path.resolve()}'
  else:
    texts = data_lib.tokenizer_texts(task, c.data)
    tokenizer = embedded_tokenizer(
        texts, c.model.tokenizer_vocab_size, c.model.tokenizer_cache,
        whole=[c.data.answer_prefix + o for o in task.options])
    cfg = PRESETS[c.model.preset].replace(**execution)
    if len(tokenizer) > cfg.vocab_size:
      cfg = cfg.replace(vocab_size=len(tokenizer))
    base = init_params(cfg, jax.random.key(c.seed))
    described = (f'preset {c.model.preset!r} with random weights (seed '
                 f'{c.seed}); embedded BPE tokenizer, {len(tokenizer)} tokens')
  return Llama(cfg, lcfg), base, tokenizer, described


def device_mesh(num_clients: int, model_shards: int):
  """A (clients, model) mesh over the local devices, or None on one device.

  The client axis gets the largest divisor of ``num_clients`` that fits the
  devices left after ``model_shards`` (the base split, 1: replicated).
  """
  devices = jax.device_count()
  if model_shards < 1 or devices % model_shards:
    raise ValueError(f'config.model.shards={model_shards} must be >= 1 and '
                     f'divide the {devices} devices')
  client_shards = max(d for d in range(1, devices // model_shards + 1)
                      if num_clients % d == 0)
  if client_shards * model_shards == 1:
    return None
  return sharding.make_mesh(client_shards, model_shards)


def client_steps(counts: np.ndarray, amount: float, unit: str,
                 batch_size: int) -> np.ndarray:
  """Real optimizer steps per client: ``amount`` steps, or epochs of data."""
  if unit == 'steps':
    return np.where(counts > 0, int(amount), 0).astype(np.int32)
  return np.ceil(amount * counts / batch_size).astype(np.int32)


def evaluate(model, base, lora_n, options, task, c, tokenizer) -> dict:
  """Per-client and mean/std metrics of adapters ``lora_n [N, ...]``."""
  if c.eval.mode == 'generate':
    preds, _ = eval_lib.generated_predictions(
        model, base, lora_n, options, tokenizer, task.options,
        c.eval.max_new_tokens, c.eval.chunk, yes_no=task.metric == 'f1')
  else:
    scores = eval_lib.option_scores(model, base, lora_n, options,
                                    chunk=c.eval.chunk,
                                    normalize=c.eval.normalize)
    preds = np.asarray(scores).argmax(-1)
  positive = task.options.index('yes') if task.metric == 'f1' else None
  return eval_lib.classification_metrics(preds, options.labels, options.valid,
                                         task.metric, positive)


def _headline(metrics: dict, task) -> float:
  return metrics['mean'][task.metric]


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) an FDLoRA experiment; returns the results dict."""
  validate_config(c)
  t_start = time.time()
  work = Path(workdir).expanduser()
  work.mkdir(parents=True, exist_ok=True)
  timing: dict[str, float] = {}

  # ---- data ----------------------------------------------------------------
  t0 = time.time()
  task = data_lib.load_task(c.data, c.seed)
  n = c.fl.num_clients
  part = data_lib.partition(task, n, c.data, c.seed)
  data_lib.write_partition(work / 'partition.json', part, task)
  print(part.table(task))
  model, base, tokenizer, model_desc = build_model(c, task)
  train = data_lib.encode_clients(tokenizer, task, part.train, c.data)
  shots = data_lib.encode_clients(tokenizer, task, part.few_shot, c.data)
  tests = data_lib.encode_options(tokenizer, task, part.test, c.data)
  timing['data_s'] = time.time() - t0

  mesh = device_mesh(n, c.model.shards)
  if mesh is not None:
    base = sharding.shard_base(base, mesh)
    logging.info('Mesh %s over %d devices', dict(mesh.shape), mesh.size)
  counts = train.counts.astype(np.int64)
  weights = (np.ones(n) if c.fl.weighting == 'uniform'
             else counts / max(counts.sum(), 1))
  alg = FDLoRA(
      model=model, base=base, fl_cfg=c.fl, num_clients=n,
      sample=lambda s0, k: data_lib.sample_steps(
          train, s0, k, c.fl.batch_size, c.seed, c.data.length_buckets),
      steps_per_round=client_steps(counts, c.fl.inner_steps, c.fl.inner_unit,
                                   c.fl.batch_size),
      stage1_steps=client_steps(counts, c.fl.local_epochs, 'epochs',
                                c.fl.batch_size),
      client_weights=weights, seed=c.seed, mesh=mesh)
  fresh = lora_lib.init(model, jax.random.key(c.seed + 1))
  logging.info('Model: %s; LoRA %d params (%d bytes) per adapter',
               model_desc, lora_lib.num_params(fresh),
               lora_lib.num_bytes(fresh))

  # ---- resume or stage 1 ---------------------------------------------------
  ckpts = io_lib.StateCheckpoints(work / 'checkpoints')
  resume = ckpts.latest_step()
  if resume is not None:
    check_resumable(work / 'config.json', c)
  (work / 'config.json').write_text(c.to_json_best_effort(indent=2))
  log = io_lib.MetricsLog(work / 'metrics.jsonl', resume)
  events = io_lib.EventWriter(work)
  t0 = time.time()
  if resume is None:
    bar = tqdm(total=int(alg.stage1_steps.max()), desc='stage 1 (local)',
               unit='step', disable=None)
    state, m1 = alg.stage1(fresh, progress=lambda i, _: bar.update(
        i - bar.n))
    bar.close()
    m1['wall_s'] = time.time() - t0
    ckpts.save(0, state)
    log.write(m1)
    events.scalars(0, {'train/loss': float(np.mean(m1['train_loss']))})
  else:
    state = ckpts.restore(alg.initial_state(fresh), resume)
    logging.info('Resumed from %s at round %d', ckpts.directory, resume)
  timing['stage1_s'] = time.time() - t0

  # ---- stage 2: federated rounds -------------------------------------------
  t0 = time.time()
  start = int(state['round'])
  for _ in tqdm(range(start, c.fl.rounds), desc='stage 2 (federated)',
                unit='round', initial=start, total=c.fl.rounds, disable=None):
    t_round = time.time()
    state, m = alg.fl_round(state)
    t = m['round']
    if c.eval.every and (t % c.eval.every == 0 or t == c.fl.rounds):
      g = lora_lib.replicate(state['global'], n)
      m['eval_global'] = evaluate(model, base, g, tests, task, c,
                                   tokenizer)['mean']
    m['stage'] = 2
    m['wall_s'] = time.time() - t_round
    ckpts.save(t, state)
    log.write(m)
    scalars = {'train/loss': m['train_loss_mean'],
               'server/delta_norm': m['delta_norm']}
    for k, v in m.get('eval_global', {}).items():
      scalars[f'eval_global/{k}'] = v
    events.scalars(t, scalars)
  timing['stage2_s'] = time.time() - t0

  # ---- stage 3: AdaFusion --------------------------------------------------
  t0 = time.time()
  personal = state['personal']
  global_n = lora_lib.replicate(state['global'], n)
  # Padded rows of clients with fewer shots carry no loss tokens.
  shot_batch = {'tokens': shots.tokens, 'loss_mask': shots.loss_mask,
                'attention_mask': shots.attention_mask}
  fitness = fusion_lib.make_fitness_fn(model, base, personal, global_n,
                                       shot_batch, lam=c.fusion.lam)
  w, history = fusion_lib.adafusion(fitness, n, c.fusion,
                                    jax.random.key(c.seed + 2))
  timing['fusion_s'] = time.time() - t0

  # ---- evaluation ------------------------------------------------------------
  t0 = time.time()
  adapters = {'personalized': personal, 'global': global_n,
              'fused': fusion_lib.fuse(personal, global_n, w)}
  for kind in c.fusion.baselines:
    wb = fusion_lib.baseline_weights(kind, n, jax.random.key(c.seed + 3),
                                     bounds=tuple(c.fusion.bounds))
    adapters[f'fusion_{kind}'] = fusion_lib.fuse(personal, global_n, wb)
  evaluated = {name: evaluate(model, base, lo, tests, task, c, tokenizer)
               for name, lo in tqdm(adapters.items(), desc='evaluation',
                                    disable=None)}
  timing['eval_s'] = time.time() - t0
  timing['total_s'] = time.time() - t_start

  rounds = c.fl.rounds
  size = lora_lib.num_bytes(state['global'])
  up1 = size if c.fl.global_init == 'mean_personal' else 0
  results = {
      'data_source': task.data_source,
      'is_synthetic': task.is_synthetic,
      'task': task.name, 'metric': task.metric,
      'model': model_desc,
      'seed': c.seed,
      'num_clients': n,
      'partition': part.method,
      'fusion_weights': np.asarray(w).tolist(),
      'fusion_best_fitness': np.asarray(history['best_fitness']).tolist(),
      'models': evaluated,
      'communication': {
          'adapter_bytes': size,
          'bytes_up_per_client': up1 + rounds * size,
          'bytes_down_per_client': rounds * size,
          'bytes_total': n * (up1 + 2 * rounds * size),
          'note': 'global adapters only; personalized adapters and data '
                  'never leave a client',
      },
      'timing': timing,
      'config': json.loads(c.to_json_best_effort()),
  }
  io_lib.write_json(work / 'results.json', results)
  log.write({'stage': 3, 'round': rounds, 'fusion_weights': results[
      'fusion_weights'], **{f'{k}_{task.metric}': _headline(v, task)
                            for k, v in evaluated.items()}})
  events.scalars(rounds, {f'final/{k}': _headline(v, task)
                          for k, v in evaluated.items()})
  events.close()
  ckpts.close()
  table = eval_lib.format_table(evaluated, _metric_names(task))
  banner = ('SYNTHETIC data' if task.is_synthetic else 'real data')
  print(f'\n{task.name} ({banner}: {task.data_source})\nmodel: {model_desc}\n'
        f'{table}\nresults: {work / "results.json"}')
  return results


def _metric_names(task) -> tuple[str, ...]:
  if task.metric == 'f1':
    return ('f1', 'precision', 'recall', 'accuracy')
  # micro-F1 equals accuracy for single-label tasks (ChemProt, RCT).
  return ('micro_f1', 'accuracy') if task.metric == 'micro_f1' else (
      'accuracy',)
