"""One experiment from a config: data, model, one method, evaluation, outputs.

``main.py`` calls :func:`run`; tests call it too with tiny configs. The method
is ``config.method``, looked up in :data:`fdlora_jax.fl.methods.METHODS`; this
module knows no method by name. Running again on the same workdir resumes
from the newest checkpoint.

Order, so that bad input leaves nothing behind: every config field is
checked, then data, tokenizer and model are loaded and encoded; only then is
anything written to the workdir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from fdlora_jax import data as data_lib
from fdlora_jax import evaluate as eval_lib
from fdlora_jax import io as io_lib
from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax import checkpoint as checkpoint_lib
from fdlora_jax.checkpoint import load_pretrained
from fdlora_jax.data.tasks import TASKS
from fdlora_jax.data.tokenize import CHAT_TEMPLATE_MODES
from fdlora_jax.errors import (ConfigError, DataError, MissingFileError,
                               UserError, need)
from fdlora_jax.fl import engine as engine_lib
from fdlora_jax.fl.methods import METHODS
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import (ATTENTION, PRESETS, PROJECTIONS, Llama,
                              init_params)
from fdlora_jax.tokenizer import embedded_tokenizer, load_tokenizer


# ---------------------------------------------------------------------------
# Config validation: every field, before any compute, naming the field
# ---------------------------------------------------------------------------
def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first bad field."""
  need(c.method in METHODS, 'method', c.method,
       f'unknown method; choose from {sorted(METHODS)}')
  fl = c.fl
  need(fl.num_clients >= 1, 'fl.num_clients', fl.num_clients, 'must be >= 1')
  need(fl.inner_steps >= 1, 'fl.inner_steps', fl.inner_steps,
       'K must be >= 1')
  need(fl.rounds >= 0, 'fl.rounds', fl.rounds, 'must be >= 0')
  need(fl.batch_size >= 1, 'fl.batch_size', fl.batch_size, 'must be >= 1')
  need(fl.grad_accum >= 1 and fl.batch_size % fl.grad_accum == 0,
       'fl.grad_accum', fl.grad_accum,
       f'must be >= 1 and divide fl.batch_size ({fl.batch_size})')
  need(fl.local_epochs >= 0, 'fl.local_epochs', fl.local_epochs,
       'must be >= 0')
  need(fl.local_steps >= 0, 'fl.local_steps', fl.local_steps,
       'must be >= 0 (0: fl.local_epochs epochs instead)')
  need(fl.stage1_chunk >= 1, 'fl.stage1_chunk', fl.stage1_chunk,
       'must be >= 1')
  need(fl.inner_unit in ('steps', 'epochs'), 'fl.inner_unit', fl.inner_unit,
       "must be 'steps' or 'epochs'")
  need(fl.inner_lr > 0, 'fl.inner_lr', fl.inner_lr, 'must be > 0')
  need(fl.inner_warmup_steps >= 0, 'fl.inner_warmup_steps',
       fl.inner_warmup_steps, 'must be >= 0')
  need(fl.inner_schedule in engine_lib.INNER_SCHEDULES, 'fl.inner_schedule',
       fl.inner_schedule, f'choose from {engine_lib.INNER_SCHEDULES}')
  need(fl.inner_optimizer in engine_lib.INNER_OPTIMIZERS, 'fl.inner_optimizer',
       fl.inner_optimizer, f'choose from {engine_lib.INNER_OPTIMIZERS}')
  need(c.data.dirichlet_alpha > 0, 'data.dirichlet_alpha',
       c.data.dirichlet_alpha, 'the Dirichlet alpha must be > 0')
  need(c.data.task in TASKS, 'data.task', c.data.task,
       f'choose from {TASKS}')
  need(c.data.max_length >= 8, 'data.max_length', c.data.max_length,
       'must be >= 8')
  need(c.data.chat_template in CHAT_TEMPLATE_MODES, 'data.chat_template',
       c.data.chat_template, f'choose from {CHAT_TEMPLATE_MODES}')
  need(c.lora.rank > 0, 'lora.rank', c.lora.rank, 'must be > 0')
  need(c.lora.alpha > 0, 'lora.alpha', c.lora.alpha, 'must be > 0')
  need(0 <= c.lora.dropout < 1, 'lora.dropout', c.lora.dropout,
       'must be in [0, 1)')
  bad = [t for t in c.lora.targets if t not in PROJECTIONS]
  need(not bad, 'lora.targets', tuple(c.lora.targets),
       f'{bad} are not projections of a LLaMA model; choose from '
       f'{PROJECTIONS}')
  need(c.model.checkpoint or c.model.name or c.model.preset in PRESETS,
       'model.preset', c.model.preset,
       f'unknown; choose from {sorted(PRESETS)}')
  need(c.model.attention in ATTENTION, 'model.attention', c.model.attention,
       f'choose from {ATTENTION}')
  for field in ('dtype', 'param_dtype'):
    need(_is_float_dtype(c.model[field]), f'model.{field}', c.model[field],
         "not a float dtype: e.g. 'float32' or 'bfloat16'")
  if c.model.name and not c.model.checkpoint:
    need(c.model.name in checkpoint_lib.NAMED_MODELS, 'model.name',
         c.model.name, f'choose from {sorted(checkpoint_lib.NAMED_MODELS)}, '
         f'or set model.checkpoint to a local directory or .gguf file')
    checkpoint_lib.resolve_model_name(c.model.name)  # installed? (pip hint)
  if c.model.checkpoint:
    path = Path(c.model.checkpoint).expanduser()
    if not path.exists():
      raise MissingFileError(f'config.model.checkpoint: {path} does not '
                             f'exist')
  need(c.eval.every >= 0, 'eval.every', c.eval.every, 'must be >= 0')
  need(c.eval.chunk >= 1, 'eval.chunk', c.eval.chunk, 'must be >= 1')
  need(c.eval.mode in ('score', 'generate'), 'eval.mode', c.eval.mode,
       "must be 'score' (option log-likelihood) or 'generate' (greedy)")
  need(c.eval.normalize in ('sum', 'mean'), 'eval.normalize',
       c.eval.normalize, "must be 'sum' or 'mean'")
  for name, module in METHODS.items():
    if name == c.method:
      module.validate(c)


def _is_float_dtype(name) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    return False


# Fields a resumed run may change: they do not shape the saved state.
RESUMABLE_CHANGES = ('fl.rounds', 'eval.')


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
    raise ConfigError(f'{saved_path.parent} has checkpoints but no '
                     f'config.json; cannot check it is the same experiment')
  # A method may name fields of its own that do not shape the saved state
  # (FDLoRA: its search phase's settings).
  allowed = RESUMABLE_CHANGES + tuple(
      getattr(METHODS.get(c.method), 'RESUMABLE', ()))
  details = config_changes(json.loads(saved_path.read_text()), c,
                           allowed + other_methods(c))
  if details:
    raise ConfigError(
        f'{saved_path.parent} holds a run with a different config ({details}'
        f'); use a new --workdir, or change only {", ".join(allowed)} when '
        f'resuming')


def other_methods(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config blocks of every method but ``c.method`` (``'fedkd.'``, ...):
  no method reads another's block, so they never change what a run did."""
  return tuple(f'{name}.' for name in METHODS if name != c.method)


def config_changes(saved: dict, c: ml_collections.ConfigDict,
                   allowed: tuple[str, ...] = ()) -> str:
  """``'field: old -> new, ...'`` (at most 6) for the fields of ``c`` that
  differ from the ``saved`` config dict, ignoring those starting with any of
  ``allowed``; ``''`` when none does."""
  # Both as results.json writes them (non-finite floats as strings).
  saved = _flatten(io_lib.to_jsonable(saved))
  now = _flatten(io_lib.to_jsonable(json.loads(c.to_json_best_effort())))
  changed = sorted(k for k in set(saved) | set(now)
                   if saved.get(k) != now.get(k)
                   and not (allowed and k.startswith(allowed)))
  return ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}'
                   for k in changed[:6]) + (' ...' if len(changed) > 6 else '')


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------
def build_model(c, task):
  """(model, base params, tokenizer, model description)."""
  execution = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                   remat=c.model.remat, attention=c.model.attention)
  lcfg = LoraConfig.from_config(c.lora)
  if c.model.checkpoint or c.model.name:
    path = (Path(c.model.checkpoint).expanduser() if c.model.checkpoint
            else checkpoint_lib.resolve_model_name(c.model.name))
    cfg, base, tokenizer = _load_pretrained(path, execution)
    described = (f'{c.model.name} ({path.resolve()})' if not
                 c.model.checkpoint else f'checkpoint {path.resolve()}')
  else:
    texts = data_lib.tokenizer_texts(task, c.data)
    tokenizer = embedded_tokenizer(
        texts, c.model.tokenizer_vocab_size, c.model.tokenizer_cache,
        whole=[data_lib.plain_answer_prefix(c.data) + o
               for o in task.options])
    cfg = PRESETS[c.model.preset].replace(**execution)
    if len(tokenizer) > cfg.vocab_size:
      cfg = cfg.replace(vocab_size=len(tokenizer))
    base = init_params(cfg, jax.random.key(c.seed))
    described = (f'preset {c.model.preset!r} with random weights (seed '
                 f'{c.seed}); embedded BPE tokenizer, {len(tokenizer)} tokens')
  return Llama(cfg, lcfg), base, tokenizer, described


_PRETRAINED: dict = {}   # one pretrained model per process (suites)


def _load_pretrained(path: Path, execution: dict):
  """(config, base params, tokenizer) of a local checkpoint; the last one
  loaded is kept, so the points of a suite load it once."""
  key = (str(path.resolve()), tuple(sorted(execution.items())))
  if key not in _PRETRAINED:
    _PRETRAINED.clear()
    cfg, base = load_pretrained(path, **execution)
    try:
      tokenizer = load_tokenizer(str(path))
    except (OSError, ValueError, TypeError) as e:
      if isinstance(e, UserError):
        raise
      raise DataError(f'{path}: no usable tokenizer files '
                      f'({str(e).splitlines()[0] if str(e) else type(e)})'
                      ) from e
    if len(tokenizer) > cfg.vocab_size:
      raise ConfigError(f'{path}: tokenizer has {len(tokenizer)} tokens but '
                        f'config.json vocab_size is {cfg.vocab_size}')
    _PRETRAINED[key] = (cfg, base, tokenizer)
  return _PRETRAINED[key]


def device_mesh(num_clients: int, model_shards: int):
  """A (clients, model) mesh over the local devices, or None on one device.

  The client axis gets the largest divisor of ``num_clients`` that fits the
  devices left after ``model_shards`` (the base split, 1: replicated).
  """
  devices = jax.device_count()
  if model_shards < 1 or devices % model_shards:
    raise ConfigError(f'config.model.shards={model_shards} must be >= 1 and '
                     f'divide the {devices} devices')
  client_shards = max(d for d in range(1, devices // model_shards + 1)
                      if num_clients % d == 0)
  if client_shards * model_shards == 1:
    return None
  return sharding.make_mesh(client_shards, model_shards)


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
  return eval_lib.classification_metrics(preds, options.labels, options.valid,
                                         task.metric, _positive(task))


def _positive(task):
  """The F1 task's positive class ('yes' = anomalous), else None."""
  return task.options.index('yes') if task.metric == 'f1' else None


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
def _label_counts(task, indices) -> np.ndarray:
  labels = task.labels()
  return np.stack([np.bincount(labels[np.asarray(ix, np.int64)],
                               minlength=len(task.options))
                   for ix in indices]).astype(np.int64)


def _option_ids(tokenizer, task, data_cfg):
  """First token of each answer option, or None if two options share it."""
  prefix = data_lib.answer_prefix(tokenizer, data_cfg)
  first = [tokenizer(prefix + o, add_special_tokens=False)['input_ids'][0]
           for o in task.options]
  return np.asarray(first, np.int32) if len(set(first)) == len(first) \
      else None


def _communication(records: list[dict], n: int) -> dict:
  """Totals of the bytes each client downloaded and uploaded, from the
  engine's per-repeat counts in ``metrics.jsonl``."""
  per_round = [{'phase': r['phase'], 'round': r['round'],
                'bytes_down_per_client': r['bytes_down_per_client'],
                'bytes_up_per_client': r['bytes_up_per_client']}
               for r in records if 'bytes_up_per_client' in r]
  down = np.sum([r['bytes_down_per_client'] for r in per_round], 0) \
      if per_round else np.zeros(n, np.int64)
  up = np.sum([r['bytes_up_per_client'] for r in per_round], 0) \
      if per_round else np.zeros(n, np.int64)
  return {'bytes_down_per_client': down.tolist(),
          'bytes_up_per_client': up.tolist(),
          'bytes_total': int(down.sum() + up.sum()),
          'per_round': per_round}


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) ``c.method`` on ``c``'s data; returns the results."""
  validate_config(c)
  method_module = METHODS[c.method]
  t_start = time.time()
  work = Path(workdir).expanduser()
  timing: dict[str, float] = {}

  # ---- data and model (nothing written yet) --------------------------------
  t0 = time.time()
  task = data_lib.load_task(c.data, c.seed)
  n = c.fl.num_clients
  part = data_lib.partition(task, n, c.data, c.seed)
  model, base, tokenizer, model_desc = build_model(c, task)
  train = data_lib.encode_clients(tokenizer, task, part.train, c.data)
  shots = data_lib.encode_clients(tokenizer, task, part.few_shot, c.data)
  setup = engine_lib.Setup(
      model=model, base=base, config=c, num_clients=n,
      train_counts=train.counts.astype(np.int64),
      label_counts=_label_counts(task, part.train),
      few_shot={'tokens': shots.tokens, 'loss_mask': shots.loss_mask,
                'attention_mask': shots.attention_mask},
      lora_init=lambda key: lora_lib.init(model, key),
      option_ids=_option_ids(tokenizer, task, c.data))
  method = method_module.build(setup)
  demos = (data_lib.demonstrations(part.train, method.context_shots, c.seed)
           if method.context_shots else None)
  tests = data_lib.encode_options(tokenizer, task, part.test, c.data,
                                  demos=demos,
                                  context_length=method.context_length or None)
  timing['data_s'] = time.time() - t0

  mesh = device_mesh(n, c.model.shards)
  if mesh is not None:
    base = sharding.shard_base(base, mesh)
    logging.info('Mesh %s over %d devices', dict(mesh.shape), mesh.size)
  engine = engine_lib.Engine(
      method=method, model=model, base=base, fl_cfg=c.fl, num_clients=n,
      sample=lambda s0, k: data_lib.sample_steps(
          train, s0, k, c.fl.batch_size, c.seed, c.data.length_buckets),
      seed=c.seed, mesh=mesh)
  schedule = engine.schedule()

  # ---- outputs start here ----------------------------------------------------
  work.mkdir(parents=True, exist_ok=True)
  ckpts = io_lib.StateCheckpoints(work / 'checkpoints')
  resume = ckpts.latest_step()
  if resume is not None:
    check_resumable(work / 'config.json', c)
  (work / 'config.json').write_text(c.to_json_best_effort(indent=2))
  data_lib.write_partition(work / 'partition.json', part, task)
  print(part.table(task))
  print(f'method {c.method}: '
        f'{" -> ".join(p.name for p in method.phases) or "no training"}; '
        f'model: {model_desc}')
  log = io_lib.MetricsLog(work / 'metrics.jsonl', resume)
  events = io_lib.EventWriter(work)
  state = engine.initial_state(jax.random.key(c.seed + 1))
  if resume:
    state = ckpts.restore(state, resume)
    logging.info('Resumed from %s at step %d of %d', ckpts.directory, resume,
                 len(schedule))

  # ---- training phases -------------------------------------------------------
  t0 = time.time()
  bar, bar_phase = None, None
  for index in range(int(state['done']), len(schedule)):
    phase, repeat, t, _ = schedule[index]
    if bar_phase is not phase:
      if bar is not None:
        bar.close()
      bar, bar_phase = _phase_bar(phase, repeat), phase
    t_repeat = time.time()
    step_bar = bar if phase.repeats == 1 else None
    state, m = engine.run_repeat(
        state, index, progress=(lambda i, _: step_bar.update(i - step_bar.n))
        if step_bar is not None else None)
    if phase.repeats > 1:
      bar.update(1)
    bar.set_postfix(loss=f'{m["train_loss_mean"]:.3f}')
    last = index + 1 == len(schedule) or schedule[index + 1][0] is not phase
    if (method.progress_rows and phase.repeats > 1 and c.eval.every and
        (t % c.eval.every == 0 or last)):
      for name, adapters in method.progress_rows(state['server'],
                                                 state['client']).items():
        m[f'eval_{name}'] = evaluate(model, base, adapters, tests, task, c,
                                     tokenizer)['mean']
    m['step'] = index + 1
    m['wall_s'] = time.time() - t_repeat
    # The metrics line first, then the checkpoint: a run killed in between
    # resumes from the previous checkpoint and drops this line.
    log.write(m)
    ckpts.save(index + 1, state)
    scalars = {'train/loss': m['train_loss_mean']}
    for k, v in m.items():
      if k.startswith('eval_'):
        scalars.update({f'{k}/{name}': x for name, x in v.items()})
      elif k == 'delta_norm':
        scalars['server/delta_norm'] = v
    events.scalars(index + 1, scalars)
  if bar is not None:
    bar.close()
  timing['train_s'] = time.time() - t0

  # ---- search phases (e.g. AdaFusion) ------------------------------------------
  t0 = time.time()
  bars = {}
  state, searched = engine.run_searches(
      state, progress=lambda name: _search_progress(name, bars))
  for b in bars.values():
    b.close()
  timing['search_s'] = time.time() - t0

  # ---- evaluation ------------------------------------------------------------
  t0 = time.time()
  rows = method.rows(state['server'], state['client'])
  evaluated = {name: evaluate(model, base, adapters, tests, task, c,
                              tokenizer)
               for name, adapters in tqdm(rows.items(), desc='evaluation',
                                          unit='row', disable=None)}
  timing['eval_s'] = time.time() - t0
  positive = _positive(task)
  # No model at all: each client answers its training split's majority; for
  # F1 tasks also "always the positive class", the trivial F1 baseline.
  # {key in results.json: (console row, metrics)}
  references = {'majority': ('majority (no model)', eval_lib.majority_guess(
      _label_counts(task, part.train), tests.labels, tests.valid, task.metric,
      positive))}
  if positive is not None:
    references['always_positive'] = (
        f'always "{task.options[positive]}" (no model)',
        eval_lib.constant_guess(positive, tests.labels, tests.valid,
                                task.metric, positive))
  timing['total_s'] = time.time() - t_start

  headline = method.headline or next(iter(rows))
  records = log.records()
  results = {
      'method': c.method,
      'headline': headline,
      'data_source': task.data_source,
      'is_synthetic': task.is_synthetic,
      'skipped_lines': dict(task.skipped_by_file),
      'task': task.name, 'metric': task.metric,
      'model': model_desc,
      'seed': c.seed,
      'num_clients': n,
      'partition': part.method,
      'phases': [p.name for p in method.phases],
      'models': evaluated,
      'reference': {k: m for k, (_, m) in references.items()},
      'search': searched,
      'context_shots': {
          'k': method.context_shots,
          'max_length': int(tests.tokens.shape[-1]) if method.context_shots
          else 0,
          'used_mean': float(np.asarray(tests.demos_used)[
              np.asarray(tests.valid)].mean()) if method.context_shots
          and np.asarray(tests.valid).any() else 0.0},
      'communication': _communication(records, n),
      'timing': timing,
      'config': json.loads(c.to_json_best_effort()),
  }
  io_lib.write_json(work / 'results.json', results)
  final = {'phase': 'final', 'round': c.fl.rounds,
           **{f'{k}_{task.metric}': v['mean'][task.metric]
              for k, v in evaluated.items()}}
  log.write(final)
  events.scalars(len(schedule), {f'final/{k}': v['mean'][task.metric]
                                 for k, v in evaluated.items()})
  events.close()
  ckpts.close()
  table = eval_lib.format_table(
      {**evaluated, **dict(references.values())}, _metric_names(task))
  banner = ('SYNTHETIC data' if task.is_synthetic else 'real data')
  print(f'\n{task.name} ({banner}: {task.data_source})\nmethod: {c.method}'
        f'\nmodel: {model_desc}\n{table}\nresults: {work / "results.json"}')
  return results


def _phase_bar(phase, repeat: int):
  if phase.repeats > 1:
    return tqdm(total=phase.repeats, initial=repeat, desc=phase.name,
                unit='round', disable=None)
  return tqdm(total=engine_lib.Engine.max_steps(phase), desc=phase.name,
              unit='step', disable=None)


def _search_progress(name: str, bars: dict):
  """A ``(done, total)`` callback that draws a bar for one search phase
  (made on its first call, when the total is known); kept in ``bars``."""
  def update(done: int, total: int):
    if name not in bars:
      bars[name] = tqdm(total=total, desc=name, unit='generation',
                        disable=None)
    bars[name].update(max(done - bars[name].n, 0))
  return update


def _metric_names(task) -> tuple[str, ...]:
  if task.metric == 'f1':
    return ('f1', 'precision', 'recall', 'accuracy')
  # micro-F1 equals accuracy for single-label tasks (ChemProt, RCT).
  return ('micro_f1', 'accuracy') if task.metric == 'micro_f1' else (
      'accuracy',)
