"""One experiment from a config: data, model, one method, evaluation, outputs.

``main.py`` calls :func:`run`; tests call it too with tiny configs. The method
is ``config.method``, resolved once by
:func:`fdlora_jax.fl.methods.method_module`; this module knows no method by
name. Running again on the same workdir resumes from the newest checkpoint.

:func:`run` is five steps: :func:`prepare` (data, model, method, engine),
:func:`open_outputs` (the workdir), :func:`train`, :func:`search` and
:func:`evaluate`, then :func:`write`. Order, so that bad input leaves nothing
behind: every config field is checked, then data, tokenizer and model are
loaded and encoded; only then is anything written to the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

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
from fdlora_jax import outcomes as outcomes_lib
from fdlora_jax import sharding
from fdlora_jax import checkpoint as checkpoint_lib
from fdlora_jax.data.tasks import TASKS
from fdlora_jax.data.tokenize import CHAT_TEMPLATE_MODES
from fdlora_jax.errors import MissingFileError, need
from fdlora_jax.fl import engine as engine_lib
from fdlora_jax.fl import privacy
from fdlora_jax.fl import step as step_lib
from fdlora_jax.fl.api import EvalContext, Method, Setup
from fdlora_jax.fl.methods import method_module, other_blocks
from fdlora_jax.model import ATTENTION, PRESETS, PROJECTIONS
from fdlora_jax.model_loading import build_model


# ---------------------------------------------------------------------------
# Config validation: every field, before any compute, naming the field
# ---------------------------------------------------------------------------
def validate_config(c: ml_collections.ConfigDict) -> ModuleType:
  """Raises :class:`ConfigError` naming the first bad field; returns the
  module of ``c.method``."""
  module = method_module(c)
  _validate_fl(c.fl)
  _validate_data_and_model(c)
  need(c.eval.every >= 0, 'eval.every', c.eval.every, 'must be >= 0')
  need(c.eval.chunk >= 1, 'eval.chunk', c.eval.chunk, 'must be >= 1')
  need(c.eval.mode in ('score', 'generate'), 'eval.mode', c.eval.mode,
       "must be 'score' (option log-likelihood) or 'generate' (greedy)")
  need(c.eval.normalize in ('sum', 'mean'), 'eval.normalize',
       c.eval.normalize, "must be 'sum' or 'mean'")
  privacy.validate(c.dp)
  module.validate(c)
  return module


def _validate_fl(fl: ml_collections.ConfigDict) -> None:
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
  need(fl.inner_schedule in step_lib.INNER_SCHEDULES, 'fl.inner_schedule',
       fl.inner_schedule, f'choose from {step_lib.INNER_SCHEDULES}')
  need(fl.inner_optimizer in step_lib.INNER_OPTIMIZERS, 'fl.inner_optimizer',
       fl.inner_optimizer, f'choose from {step_lib.INNER_OPTIMIZERS}')


def _validate_data_and_model(c: ml_collections.ConfigDict) -> None:
  need(c.data.split in data_lib.SPLITS, 'data.split', c.data.split,
       f'choose from {data_lib.SPLITS}')
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


def _is_float_dtype(name) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    return False


# Fields a resumed run may change: they do not shape the saved state. A
# method adds its own (Method.resumable).
RESUMABLE_CHANGES = ('fl.rounds', 'eval.')


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
  """What :func:`prepare` makes before anything is written."""
  config: ml_collections.ConfigDict
  task: Any
  part: Any                     # the federated partition
  model: Any
  tokenizer: Any
  model_desc: str
  method: Method
  engine: engine_lib.Engine     # its base is the one to evaluate (on a mesh)
  label_counts: np.ndarray      # [N, O] training examples per answer option
  context: Optional[EvalContext]  # what the method puts before each prompt
  tests: Any                    # OptionArrays of the test splits
  timing: dict[str, float]

  def evaluate(self, adapters) -> dict:
    """Metrics of ``adapters [N, ...]`` (None: the base) on the tests."""
    return eval_lib.evaluate_adapters(
        self.model, self.engine.base, adapters, self.tests, self.task,
        self.config.eval, self.tokenizer)

  def predict(self, adapters) -> tuple[np.ndarray, outcomes_lib.PerExample]:
    """``(preds [N, M], per-example record)`` of ``adapters [N, ...]``."""
    preds, scores = eval_lib.adapter_predictions(
        self.model, self.engine.base, adapters, self.tests, self.task,
        self.config.eval, self.tokenizer)
    return preds, self.outcome(preds, scores)

  def outcome(self, preds, scores=None) -> outcomes_lib.PerExample:
    """Answers ``preds [N, M]`` (and option scores) on the tests, flat."""
    return outcomes_lib.from_arrays(preds, self.tests.labels,
                                    self.tests.valid, self.part.test, scores)

  def metrics(self, preds, outcome: outcomes_lib.PerExample) -> dict:
    """One row's client means (``classification_metrics``) and pooled
    figures with intervals (``outcomes.figures``)."""
    positive = eval_lib.positive_option(self.task)
    m = eval_lib.classification_metrics(preds, self.tests.labels,
                                        self.tests.valid, self.task.metric,
                                        positive)
    m.update(outcomes_lib.figures(outcome, positive, self.engine.num_clients,
                                  seed=self.config.seed))
    return m


@dataclasses.dataclass
class Outputs:
  """The workdir's writers, opened by :func:`open_outputs`."""
  work: Path
  checkpoints: io_lib.StateCheckpoints
  log: io_lib.MetricsLog
  events: io_lib.EventWriter
  resume: Optional[int]         # the checkpoint step resumed from
  primary: bool = True          # jax.distributed: process 0 writes the files


class _Discard:
  """The metrics log and event writer of a process other than the first
  under ``jax.distributed``: the first process writes them."""

  def write(self, record: dict) -> None:
    pass

  def scalars(self, step: int, values: dict) -> None:
    pass

  def records(self) -> list[dict]:
    return []

  def close(self) -> None:
    pass


def run(c: ml_collections.ConfigDict, workdir: str,
        checkpoint_every_s: float = 0.0) -> dict:
  """Runs (or resumes) ``c.method`` on ``c``'s data; returns the results.

  The run state is checkpointed after every repeat, or with
  ``checkpoint_every_s`` > 0 at most that often (and after each phase's
  last repeat): the outputs are the same, a killed run redoes more."""
  t_start = time.time()
  x = prepare(c, validate_config(c))
  out = open_outputs(x, Path(workdir).expanduser(), checkpoint_every_s)
  state, repeats = train(x, out)
  state, searched = search(x, state)
  evaluated, references = evaluate(x, state)
  x.timing['total_s'] = time.time() - t_start
  return write(x, out, evaluated, references, searched, repeats)


def prepare(c: ml_collections.ConfigDict, module: ModuleType) -> Experiment:
  """Loads and encodes data, builds the model, the method and its engine."""
  t0 = time.time()
  task = data_lib.load_task(c.data, c.seed)
  n = c.fl.num_clients
  part = data_lib.partition(task, n, c.data, c.seed)
  model, base, tokenizer, model_desc = build_model(c, task)
  train_arrays = data_lib.encode_clients(tokenizer, task, part.train, c.data)
  shots = data_lib.encode_clients(tokenizer, task, part.few_shot, c.data)
  counts = data_lib.label_counts(task, part.train)
  method = module.build(Setup(
      model=model, base=base, config=c, num_clients=n,
      train_counts=train_arrays.counts.astype(np.int64), label_counts=counts,
      few_shot={'tokens': shots.tokens, 'loss_mask': shots.loss_mask,
                'attention_mask': shots.attention_mask},
      lora_init=lambda key: lora_lib.init(model, key),
      option_ids=data_lib.option_ids(tokenizer, task, c.data)))
  context = method.context(part.train) if method.context else None
  tests = data_lib.encode_options(
      tokenizer, task, part.test, c.data,
      demos=context.demos if context else None,
      context_length=(context.length or None) if context else None)
  timing = {'data_s': time.time() - t0}
  mesh = sharding.device_mesh(n, c.model.shards)
  if mesh is not None:
    base = sharding.shard_base(base, mesh)
    logging.info('Mesh %s over %d devices', dict(mesh.shape), mesh.size)
  engine = engine_lib.Engine(
      method=method, model=model, base=base, fl_cfg=c.fl, num_clients=n,
      sample=lambda s0, k: data_lib.sample_steps(
          train_arrays, s0, k, c.fl.batch_size, c.seed,
          c.data.length_buckets),
      seed=c.seed, mesh=mesh, dp=c.dp)
  return Experiment(c, task, part, model, tokenizer, model_desc, method,
                    engine, counts, context, tests, timing)


def open_outputs(x: Experiment, work: Path,
                 checkpoint_every_s: float = 0.0) -> Outputs:
  """The workdir: refuses to resume under a config that changes the saved
  state, then writes the config and the partition."""
  c = x.config
  work.mkdir(parents=True, exist_ok=True)
  checkpoints = io_lib.StateCheckpoints(work / 'checkpoints',
                                        min_interval_s=checkpoint_every_s)
  resume = checkpoints.latest_step()
  if resume is not None:
    # Under DP every round spends privacy (and dp.epsilon fixes the noise
    # for the configured rounds): a resume may not add rounds.
    allowed = tuple(f for f in RESUMABLE_CHANGES
                    if not (c.dp.enabled and f == 'fl.rounds'))
    io_lib.check_resumable(work / 'config.json', c,
                           allowed=allowed + x.method.resumable,
                           ignored=other_blocks(c))
  primary = jax.process_index() == 0
  if not primary:     # every process trains; the first one writes
    return Outputs(work, checkpoints, _Discard(), _Discard(), resume, False)
  (work / 'config.json').write_text(c.to_json_best_effort(indent=2))
  data_lib.write_partition(work / 'partition.json', x.part, x.task)
  print(x.part.table(x.task))
  print(f'method {c.method}: '
        f'{" -> ".join(p.name for p in x.method.phases) or "no training"}; '
        f'model: {x.model_desc}')
  return Outputs(work, checkpoints, io_lib.MetricsLog(
      work / 'metrics.jsonl', resume), io_lib.EventWriter(work), resume)


def train(x: Experiment, out: Outputs) -> tuple[dict, list[dict]]:
  """Runs the repeats not done yet, each logged, then checkpointed; returns
  the state and every repeat's metrics (an earlier process's read back from
  metrics.jsonl, this one's as computed)."""
  t0 = time.time()
  engine, schedule = x.engine, x.engine.schedule()
  state, repeats = engine.initial_state(), []
  if out.resume:
    state = out.checkpoints.restore(state, out.resume)
    repeats = out.log.records()
    logging.info('Resumed from %s at step %d of %d',
                 out.checkpoints.directory, out.resume, len(schedule))
  bar = _PhaseBar()
  for index in range(int(state['done']), len(schedule)):
    phase, repeat, t, _ = schedule[index]
    t_repeat = time.time()
    state, m = engine.run_repeat(state, index,
                                 progress=bar.start(phase, repeat))
    bar.done(phase, m['train_loss_mean'])
    m.update(_progress_eval(x, state, index))
    m['step'] = index + 1
    m['wall_s'] = time.time() - t_repeat
    # The metrics line first, then the checkpoint: a run killed in between
    # resumes from the previous checkpoint and drops this line.
    out.log.write(m)
    last = index + 1 == len(schedule) or schedule[index + 1][0] is not phase
    out.checkpoints.save(index + 1, state, force=last)
    out.events.scalars(index + 1, _scalars(m))
    repeats.append(m)
  bar.close()
  x.timing['train_s'] = time.time() - t0
  return state, repeats


def search(x: Experiment, state: dict) -> tuple[dict, dict]:
  """The method's search phases (e.g. AdaFusion), each with a bar."""
  t0 = time.time()
  bars = {}
  # A bar is a host callback inside the compiled search, and JAX's
  # persistent cache keeps no program with one: only where a bar shows.
  shown = sys.stderr.isatty()
  state, searched = x.engine.run_searches(
      state, progress=(lambda name: _search_progress(name, bars)) if shown
      else None)
  for b in bars.values():
    b.close()
  x.timing['search_s'] = time.time() - t0
  return state, searched


def evaluate(x: Experiment, state: dict) -> tuple[dict, dict]:
  """Every row's metrics and per-example answers: the method's rows, and
  the answers that need no model. ``{name: (label, metrics, outcome)}``
  each."""
  t0 = time.time()
  rows = x.method.rows(state['server'], state['client'])
  evaluated = {}
  for name, adapters in tqdm(rows.items(), desc='evaluation', unit='row',
                             disable=None):
    preds, outcome = x.predict(adapters)
    evaluated[name] = (name, x.metrics(preds, outcome), outcome)
  references = {}
  for key, (label, preds) in eval_lib.references(
      x.task, x.part, x.label_counts, x.tests).items():
    outcome = x.outcome(preds)
    references[key] = (label, x.metrics(preds, outcome), outcome)
  x.timing['eval_s'] = time.time() - t0
  return evaluated, references


def write(x: Experiment, out: Outputs, evaluated: dict, references: dict,
          searched: dict, repeats: list[dict]) -> dict:
  """predictions/<row>.npz, results.json, the final metrics line and
  scalars; prints the tables."""
  c, task = x.config, x.task
  _versus_references(x, evaluated, references)
  results = _results(x, evaluated, references, searched, repeats)
  out.checkpoints.close()
  if not out.primary:
    return results
  for name, (_, _, outcome) in evaluated.items():
    outcomes_lib.save(out.work / 'predictions' / f'{name}.npz', outcome)
  for key, (_, _, outcome) in references.items():
    outcomes_lib.save(out.work / 'predictions' / f'reference_{key}.npz',
                      outcome)
  io_lib.write_json(out.work / 'results.json', results)
  means = {k: m['mean'][task.metric] for k, (_, m, _) in evaluated.items()}
  out.log.write({'phase': 'final', 'round': c.fl.rounds,
                 **{f'{k}_{task.metric}': v for k, v in means.items()}})
  out.events.scalars(len(x.engine.schedule()),
                     {f'final/{k}': v for k, v in means.items()})
  out.events.close()
  rows = {label: m for label, m, _ in [*evaluated.values(),
                                       *references.values()]}
  table = eval_lib.format_table(rows, eval_lib.metric_names(task))
  headline = outcomes_lib.HEADLINE[task.metric][0]
  banner = ('SYNTHETIC data' if task.is_synthetic else 'real data')
  p = results['privacy']
  if p is not None:
    print(f"client-level DP: epsilon {p['epsilon']} at delta {p['delta']:g} "
          f"after {p['private_rounds']} private rounds (noise multiplier "
          f"{p['noise_multiplier']:.4g}, clip {c.dp.clip:g}"
          f"{', adaptive' if c.dp.adaptive else ''})")
  print(f'\n{task.name} ({banner}: {task.data_source})\nmethod: {c.method}'
        f'\nmodel: {x.model_desc}\n{table}\n\n'
        f'{outcomes_lib.format_figures(rows, headline)}\n'
        f'results: {out.work / "results.json"}; per-example answers: '
        f'{out.work / "predictions"}')
  return results


def _versus_references(x: Experiment, evaluated: dict,
                       references: dict) -> None:
  """Each model row's headline figure against each no-model reference on
  the same examples (a paired bootstrap), into its metrics as
  ``versus_references``."""
  positive = eval_lib.positive_option(x.task)
  headline = outcomes_lib.HEADLINE[x.task.metric][0]
  for _, m, outcome in evaluated.values():
    m['versus_references'] = {}
    for key, (_, _, ref) in references.items():
      d = outcomes_lib.paired_difference(
          [(outcome, ref)], headline, positive, x.engine.num_clients,
          seed=x.config.seed)
      d['verdict'] = outcomes_lib.versus(d['low'], d['high'])
      m['versus_references'][key] = d


# ---------------------------------------------------------------------------
# Parts of the steps
# ---------------------------------------------------------------------------
def _results(x: Experiment, evaluated: dict, references: dict,
             searched: dict, repeats: list[dict]) -> dict:
  """results.json: the same schema for every method."""
  c, task, n = x.config, x.task, x.engine.num_clients
  # Deployment: the clients that sat out a round (their SuperNode gone or
  # too slow), by step; absent when none did (and in a simulation).
  dropped = {str(r['step']): r['dropped_clients'] for r in repeats
             if r.get('dropped_clients')}
  return {
      **({'dropped_clients': dropped} if dropped else {}),
      'method': c.method,
      'headline': x.method.headline or next(iter(evaluated)),
      'data_source': task.data_source,
      'is_synthetic': task.is_synthetic,
      'skipped_lines': dict(task.skipped_by_file),
      'task': task.name, 'metric': task.metric,
      'model': x.model_desc,
      'seed': c.seed,
      'num_clients': n,
      'partition': x.part.method,
      'phases': [p.name for p in x.method.phases],
      'headline_metric': dict(zip(('name', 'why'),
                                  outcomes_lib.HEADLINE[task.metric])),
      'models': {k: m for k, (_, m, _) in evaluated.items()},
      'reference': {k: m for k, (_, m, _) in references.items()},
      'predictions': 'predictions/<row>.npz, predictions/reference_<key>.npz '
                     '(fdlora_jax.outcomes)',
      'search': searched,
      'context_shots': _context_shots(x.context, x.tests),
      'communication': engine_lib.communication(repeats, n),
      'privacy': x.engine.guarantee(len(x.engine.schedule())),
      'timing': x.timing,
      'config': json.loads(c.to_json_best_effort()),
  }


def _context_shots(context: Optional[EvalContext], tests) -> dict:
  """k, the prompt length and the mean demonstrations a prompt got."""
  k = context.shots if context else 0
  valid = np.asarray(tests.valid)
  return {'k': k,
          'max_length': int(tests.tokens.shape[-1]) if k else 0,
          'used_mean': float(np.asarray(tests.demos_used)[valid].mean())
                       if k and valid.any() else 0.0}


def _progress_eval(x: Experiment, state: dict, index: int) -> dict:
  """``eval_<row>`` means of the method's progress rows, every
  ``eval.every`` rounds and after a phase's last round."""
  schedule, every = x.engine.schedule(), x.config.eval.every
  phase, _, t, _ = schedule[index]
  last = index + 1 == len(schedule) or schedule[index + 1][0] is not phase
  if not (x.method.progress_rows and phase.repeats > 1 and every and
          (t % every == 0 or last)):
    return {}
  rows = x.method.progress_rows(state['server'], state['client'])
  return {f'eval_{name}': x.evaluate(adapters)['mean']
          for name, adapters in rows.items()}


def _scalars(m: dict) -> dict[str, float]:
  """TensorBoard scalars of one repeat's metrics."""
  scalars = {'train/loss': m['train_loss_mean']}
  for k, v in m.items():
    if k.startswith('eval_'):
      scalars.update({f'{k}/{name}': x for name, x in v.items()})
    elif k == 'delta_norm':
      scalars['server/delta_norm'] = v
  return scalars


class _PhaseBar:
  """One progress bar per training phase: its rounds, or the steps of a
  phase of one repeat."""

  def __init__(self):
    self.bar, self.phase = None, None

  def start(self, phase, repeat: int):
    """Opens the phase's bar; returns run_repeat's step callback or None."""
    if self.phase is not phase:
      self.close()
      self.phase = phase
      self.bar = (tqdm(total=phase.repeats, initial=repeat, desc=phase.name,
                       unit='round', disable=None) if phase.repeats > 1 else
                  tqdm(total=engine_lib.Engine.max_steps(phase),
                       desc=phase.name, unit='step', disable=None))
    if phase.repeats > 1:
      return None
    return lambda i, _: self.bar.update(i - self.bar.n)

  def done(self, phase, loss: float) -> None:
    if phase.repeats > 1:
      self.bar.update(1)
    self.bar.set_postfix(loss=f'{loss:.3f}')

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _search_progress(name: str, bars: dict):
  """A ``(done, total)`` callback that draws a bar for one search phase
  (made on its first call, when the total is known); kept in ``bars``."""
  def update(done: int, total: int):
    if name not in bars:
      bars[name] = tqdm(total=total, desc=name, unit='generation',
                        disable=None)
    bars[name].update(max(done - bars[name].n, 0))
  return update
