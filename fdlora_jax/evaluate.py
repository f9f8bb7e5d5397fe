"""Evaluation: multiple-choice option scoring, F1 / accuracy, a results table.

Option scoring follows lm-eval-harness and AdaptLLM: every answer option is
appended to the prompt, the model's log-likelihood of the option tokens is the
option's score, and the prediction is the best-scoring option. The examples
of all clients are packed into fixed-size chunks (no client is padded to the
largest), each row scored under its own client's adapter in one vmapped pass
over the shared base, so memory stays bounded and the function compiles once
per shape. Single-token options (' yes' / ' no') are scored from one forward
of the prompt. A row may also mix adapters per test instance
(:class:`fdlora_jax.lora.InstanceMix`, FedDPA): each packed row's adapter is
then built from its own prompt before it is scored.

Example::

  scores = option_scores(model, base, loras, arrays)     # [N, M, O]
  preds = scores.argmax(-1)
  m = classification_metrics(preds, arrays.labels, arrays.valid, 'f1',
                             positive=1)
  print(format_table({'fused': m}, ['f1', 'accuracy']))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.model import (apply_after_prefix, empty_cache, hidden_at,
                              num_targets_bucket, positions_from_mask, prefill,
                              prefix_length, prompt_end, shared_prefix,
                              shared_prefix_length,
                              target_log_probs)

PyTree = Any


def _field(arrays, name: str) -> np.ndarray:
  """``arrays.name`` or ``arrays[name]`` (a NamedTuple, dataclass or dict)."""
  if isinstance(arrays, Mapping):
    if name not in arrays:
      raise ValueError(f'option arrays have no field {name!r}')
    return arrays[name]
  if not hasattr(arrays, name):
    raise ValueError(f'option arrays have no field {name!r}')
  return getattr(arrays, name)


# ---------------------------------------------------------------------------
# Option scoring
# ---------------------------------------------------------------------------
@jax.jit
def _take_rows(tree: PyTree, idx: jax.Array) -> PyTree:
  """Rows ``idx`` of every leaf, in one program (a chunk's adapters)."""
  return jax.tree.map(lambda x: x[idx], tree)


@functools.partial(jax.jit, static_argnames=('model', 'normalize',
                                             'num_targets'))
def _chunk_scores(model, base, lora, tokens, option_mask, attention_mask,
                  normalize, num_targets, cache=None):
  """Scores ``[N, C, O]`` of one chunk of ``C`` examples for all clients
  (``cache [N, ...]``: each one's KV cache of the shared ``prefix``)."""
  n, c, o, length = tokens.shape

  def one_client(lora_c, cache_c, tok, om, am):
    tok, om, am = (x.reshape(c * o, length) for x in (tok, om, am))
    variables = ({'params': base} if lora_c is None
                 else {'params': base, 'lora': lora_c})
    logp, mask = target_log_probs(model, variables, tok, om, am,
                                  num_targets, cache=cache_c)
    total = (logp * mask).sum(-1)
    count = mask.sum(-1)
    score = total / jnp.maximum(count, 1.0) if normalize == 'mean' else total
    # An option with no tokens (padding of a shorter option list) can never
    # be predicted.
    return jnp.where(count > 0, score, -jnp.inf).reshape(c, o)

  return jax.vmap(one_client)(lora, cache, tokens, option_mask,
                              attention_mask)


@functools.partial(jax.jit, static_argnames=('model',))
def _chunk_scores_one_pass(model, base, lora, tokens, option_mask,
                           attention_mask, cache=None):
  """:func:`_chunk_scores` when every option is one token after a prompt
  shared by all options: one forward per example instead of one per option.

  The logits that predict the option token depend on the prompt alone
  (causal attention), so they are computed once, from the row of the first
  option that has a token, and each option's score is the log-probability of
  its own token there (sum and mean agree for one token).
  """
  n, c, o, length = tokens.shape

  def one_client(lora_c, cache_c, tok, om, am):
    has = om.sum(-1) > 0                                         # [C, O]
    pos = jnp.argmax(om > 0, axis=-1)                            # [C, O]
    row = jnp.argmax(has, axis=-1)                               # [C]
    take = lambda x: jnp.take_along_axis(x, row[:, None, None], 1)[:, 0]
    seq, mask = take(tok), take(am)                              # [C, L]
    at = jnp.maximum(jnp.take_along_axis(pos, row[:, None], 1) - 1, 0)
    variables = ({'params': base} if lora_c is None
                 else {'params': base, 'lora': lora_c})
    if cache_c is None:
      logits = model.apply(variables, seq, mask, positions_from_mask(mask),
                           logits_at=at)[:, 0]                   # [C, V]
    else:
      logits = apply_after_prefix(model, variables, cache_c, seq, mask,
                                  positions_from_mask(mask),
                                  logits_at=at - prefix_length(cache_c))[:, 0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ids = jnp.take_along_axis(tok, pos[..., None], -1)[..., 0]   # [C, O]
    score = jnp.take_along_axis(logp, ids, -1)
    return jnp.where(has, score, -jnp.inf)

  return jax.vmap(one_client)(lora, cache, tokens, option_mask,
                              attention_mask)


@functools.partial(jax.jit, static_argnames=('model',))
def _prefill_clients(model, base, lora, starts):
  """KV caches ``[N, ...]`` of each client's prompt start ``starts [N, P]``
  under its adapter (the bare base for ``lora=None``)."""
  def one(lora_c, start):
    variables = ({'params': base} if lora_c is None
                 else {'params': base, 'lora': lora_c})
    return prefill(model, variables, start)
  if lora is None:
    return jax.vmap(lambda start: one(None, start))(starts)
  return jax.vmap(one)(lora, starts)


@functools.partial(jax.jit, static_argnames=('model',))
def instance_adapters(model, base, mix: lora_lib.InstanceMix, tokens,
                      attention_mask, at) -> tuple[PyTree, jax.Array]:
  """``(adapters [S, ...], weights [S, K])``: the adapter of each of ``S``
  rows of an :class:`~fdlora_jax.lora.InstanceMix` whose leaves are already
  picked per row (``[S, ...]``), from the row's prompt ``tokens [S, L]``
  ending at position ``at [S]``."""
  def one(parts, probe, context, tok, mask, end):
    e = hidden_at(model, {'params': base, 'lora': probe}, tok[None],
                  mask[None], end[None])[0]
    w = mix.weigh(e, context)
    return lora_lib.mixed(parts, w), w
  return jax.vmap(one)(mix.parts, mix.probe, mix.context, tokens,
                       attention_mask, at)


def _option_prompts(tokens, option_mask, attention_mask):
  """``(tokens [S, L], attention_mask [S, L], at [S])``: each example's row
  of its first option with tokens, and its prompt's last position."""
  has = option_mask.sum(-1) > 0                                  # [S, O]
  row = np.argmax(has, -1)
  pick = lambda x: x[np.arange(len(row)), row]
  om = pick(option_mask)
  return pick(tokens), pick(attention_mask), np.asarray(prompt_end(om))


def client_prefixes(tokens, option_mask, attention_mask,
                    minimum: int = 16) -> np.ndarray:
  """``[N, P]``: the leading tokens every row of a client shares
  (:func:`shared_prefix_length` per client, ``P`` the shortest over clients
  with rows; ``[N, 0]`` when under ``minimum``). Clients' starts may differ,
  as k-shot prompts open with each client's own demonstrations; a client
  with no rows gets another's start (its cache is never read)."""
  has = option_mask.sum((-1, -2)) > 0                            # [N, M]
  owners = np.flatnonzero(has.any(-1))
  n = tokens.shape[0]
  if not len(owners):
    return np.zeros((n, 0), tokens.dtype)
  own = {c: shared_prefix(tokens[c], option_mask[c], attention_mask[c],
                         minimum=0) for c in owners}
  p = min(len(start) for start in own.values())
  if p < minimum:
    return np.zeros((n, 0), tokens.dtype)
  return np.stack([own.get(c, own[owners[0]])[:p] for c in range(n)])


def shares_prompt_single_token(tokens, option_mask, attention_mask) -> bool:
  """True when every option of every example is at most one token and all
  options of an example share the prompt before it (same tokens, mask and
  place), so :func:`_chunk_scores_one_pass` gives the same scores."""
  tokens, option_mask, attention_mask = (
      np.asarray(x) for x in (tokens, option_mask, attention_mask))
  if tokens.shape[2] < 2 or (option_mask.sum(-1) > 1).any():
    return False
  has = option_mask.sum(-1) > 0                                  # [N, M, O]
  pos = np.where(has, np.argmax(option_mask > 0, -1), -1)
  first = pos.max(-1, keepdims=True)
  if ((pos != first) & has).any():
    return False
  # The prompt: everything before the option's place (padding included).
  before = np.arange(tokens.shape[-1]) < np.maximum(first, 0)[..., None]
  for x in (tokens, attention_mask):
    prompt = np.where(before, x, 0)
    same = (prompt == prompt[:, :, :1]) | ~has[..., None]
    if not same.all():
      return False
  return True


def option_scores(model, base: PyTree, lora: Optional[PyTree], arrays,
                  chunk: int = 16, normalize: str = 'sum',
                  one_pass: Optional[bool] = None,
                  share_prefix: bool = True) -> np.ndarray:
  """Log-likelihood of every answer option given its prompt: ``[N, M, O]``.

  Args:
    model: a ``Llama`` (with the LoRA config of ``lora``, if any).
    base: base params, shared by all clients.
    lora: adapters with a leading client axis ``[N, ...]``, an
      :class:`~fdlora_jax.lora.InstanceMix` (each row's adapter built from
      its prompt; no shared prefix then), or None to score the bare base
      model for every client.
    arrays: ``tokens`` int ``[N, M, O, L]`` (prompt followed by the option),
      ``option_mask`` ``[N, M, O, L]`` (1 on the option tokens),
      ``attention_mask`` ``[N, M, O, L]``; attributes or dict keys. Left or
      right padding both work (positions count real tokens only).
    chunk: examples per compiled step, packed across clients (rows with no
      option token, i.e. padding, are skipped); the last chunk is padded, so
      every step has the same shape and there is one compilation.
    normalize: 'sum' (total log-likelihood, lm-eval's ``acc``) or 'mean'
      (divided by the number of option tokens).
    one_pass: score all options from one forward of the shared prompt
      (valid only when every option is a single token:
      :func:`shares_prompt_single_token`); None: whenever it is valid, as for
      ' yes' / ' no'. It runs O times fewer sequences and gives the same
      scores up to float rounding.
    share_prefix: run the leading tokens all rows of a client share
      (:func:`client_prefixes`) once per client into a KV cache, and only
      the rest of every row; same scores up to float rounding. It keeps a
      cache of ``chunk`` rows x the whole length in memory.

  Returns:
    float32 numpy ``[N, M, O]``; ``-inf`` for options with no token.
  """
  if normalize not in ('sum', 'mean'):
    raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')
  tokens = np.asarray(_field(arrays, 'tokens'))
  option_mask = np.asarray(_field(arrays, 'option_mask'))
  attention_mask = np.asarray(_field(arrays, 'attention_mask'))
  if tokens.ndim != 4:
    raise ValueError(f'tokens must be [N, M, O, L], got {tokens.shape}')
  for name, x in (('option_mask', option_mask),
                  ('attention_mask', attention_mask)):
    if x.shape != tokens.shape:
      raise ValueError(f'{name} has shape {x.shape}, tokens {tokens.shape}')
  n, m = tokens.shape[:2]
  if lora is not None:
    lead = {x.shape[0] for x in jax.tree.leaves(lora)}
    if lead != {n}:
      raise ValueError(f'lora must have a leading client axis of {n}, got '
                       f'{sorted(lead)}')
  valid_one_pass = shares_prompt_single_token(tokens, option_mask,
                                              attention_mask)
  if one_pass is None:
    one_pass = valid_one_pass
  elif one_pass and not valid_one_pass:
    raise ValueError('one_pass=True needs single-token options after a '
                     'prompt shared by all options')
  num_targets = num_targets_bucket(option_mask)
  # Only real rows are scored, packed across clients: clients hold different
  # numbers of examples, and an [N, M] layout pads every client to the
  # largest (4x the work on a Dirichlet(0.5) split of the LogHub samples).
  # Each packed row carries its client's adapter (gathered per chunk:
  # ``chunk`` adapters in memory at once).
  clients, rows = np.nonzero(option_mask.sum((-1, -2)) > 0)        # [R]
  out = np.full((n, m, tokens.shape[2]), -np.inf, np.float32)
  if not len(rows):
    return out
  mix = lora if isinstance(lora, lora_lib.InstanceMix) else None
  # A mixed row's adapter differs per example: no cache of a client's start.
  starts = (client_prefixes(tokens, option_mask, attention_mask)
            if share_prefix and mix is None
            else np.zeros((n, 0), tokens.dtype))
  prefix = starts.shape[1]
  caches = None
  one_start = lora is None and (starts == starts[:1]).all()
  if prefix:  # the bare base with one start for all: one cache
    caches = _prefill_clients(model, base, lora, jnp.asarray(
        starts[:1] if one_start else starts))
  step = min(chunk, len(rows))
  padded = -(-len(rows) // step) * step
  # The last chunk is filled with copies of the last row (same shape, one
  # compilation; their scores are dropped).
  take = np.concatenate([np.arange(len(rows)),
                         np.full(padded - len(rows), len(rows) - 1)])
  outs = []
  for s in range(0, padded, step):  # dispatch every chunk, then gather
    sel = take[s:s + step]
    c_sel, r_sel = clients[sel], rows[sel]
    lora_rows = (None if lora is None else
                 _take_rows(lora, jnp.asarray(c_sel)))
    tok, om, am = (x[c_sel, r_sel][:, None] for x in (
        tokens, option_mask, attention_mask))                 # [S, 1, O, L]
    if mix is not None:
      lora_rows, _ = instance_adapters(
          model, base, lora_rows, *_option_prompts(tok[:, 0], om[:, 0],
                                                   am[:, 0]))
    cache_rows = None
    if prefix:
      idx = jnp.asarray(np.zeros_like(c_sel) if one_start else c_sel)
      cache_rows = _take_rows(caches, idx)
    if one_pass:
      outs.append(_chunk_scores_one_pass(model, base, lora_rows, tok, om, am,
                                         cache_rows))
    else:
      outs.append(_chunk_scores(model, base, lora_rows, tok, om, am,
                                normalize, num_targets, cache_rows))
    sharding.pace(outs[-1])
  flat = np.concatenate([np.asarray(o)[:, 0] for o in outs])[:len(rows)]
  out[clients, rows] = flat
  return out


def predict(scores: np.ndarray) -> np.ndarray:
  """The best option per example: ``argmax`` over the last axis."""
  return np.asarray(scores).argmax(-1)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def _safe_div(a: float, b: float) -> float:
  return float(a) / float(b) if b else 0.0


def _client_metrics(pred, label, positive):
  out = {'n': int(pred.size)}
  out['accuracy'] = _safe_div((pred == label).sum(), pred.size)
  out['micro_f1'] = out['accuracy']   # single-label: micro-F1 == accuracy
  if positive is not None:
    tp = int(((pred == positive) & (label == positive)).sum())
    fp = int(((pred == positive) & (label != positive)).sum())
    fn = int(((pred != positive) & (label == positive)).sum())
    out['precision'] = _safe_div(tp, tp + fp)
    out['recall'] = _safe_div(tp, tp + fn)
    out['f1'] = _safe_div(2 * out['precision'] * out['recall'],
                          out['precision'] + out['recall'])
  return out


def classification_metrics(preds, labels, valid, metric: str = 'accuracy',
                           positive: Optional[int] = None) -> dict:
  """Per-client metrics and their mean and std over clients.

  Args:
    preds, labels: int ``[N, M]``.
    valid: bool ``[N, M]``; padded rows (False) are ignored.
    metric: the headline metric, 'f1' (binary F1 of class ``positive``, e.g.
      anomalous logs), 'accuracy' or 'micro_f1' (equal for single-label
      classification, e.g. medical QA).
    positive: the positive class; required for 'f1'. With it, precision,
      recall and f1 are reported as well. A zero denominator (no predicted
      or no true positive) gives 0.0 for that precision / recall / F1, as
      sklearn's ``zero_division=0``.

  Returns:
    ``{'metric': metric, 'per_client': [{accuracy, micro_f1, [precision,
    recall, f1,] n}, ...], 'mean': {...}, 'std': {...}}``. Mean and std
    (population std, ddof=0) are unweighted over the clients with at least
    one valid example; ``n`` in 'mean' / 'std' is the total / None.
  """
  if metric not in ('f1', 'accuracy', 'micro_f1'):
    raise ValueError(f"metric must be 'f1', 'accuracy' or 'micro_f1', got "
                     f'{metric!r}')
  if metric == 'f1' and positive is None:
    raise ValueError("metric='f1' needs the positive class (positive=...)")
  preds, labels, valid = (np.asarray(x) for x in (preds, labels, valid))
  if not preds.shape == labels.shape == valid.shape or preds.ndim != 2:
    raise ValueError(f'preds {preds.shape}, labels {labels.shape} and valid '
                     f'{valid.shape} must all be [N, M]')
  valid = valid.astype(bool)
  per_client = [_client_metrics(p[v], l[v], positive)
                for p, l, v in zip(preds, labels, valid)]
  used = [c for c in per_client if c['n'] > 0]
  names = [k for k in per_client[0] if k != 'n']
  mean = {k: float(np.mean([c[k] for c in used])) if used else 0.0
          for k in names}
  std = {k: float(np.std([c[k] for c in used])) if used else 0.0
         for k in names}
  mean['n'] = int(sum(c['n'] for c in per_client))
  std['n'] = None
  return {'metric': metric, 'per_client': per_client, 'mean': mean,
          'std': std}


def majority_guess(train_label_counts, labels, valid, metric: str = 'accuracy',
                   positive: Optional[int] = None) -> dict:
  """The no-model reference: each client always answers the most frequent
  label of its own training split (``train_label_counts [N, O]``; ties go to
  the first option), scored on ``labels [N, M]`` / ``valid [N, M]`` like
  :func:`classification_metrics`."""
  return constant_guess(np.asarray(train_label_counts).argmax(-1), labels,
                        valid, metric, positive)


def constant_guess(option, labels, valid, metric: str = 'accuracy',
                   positive: Optional[int] = None) -> dict:
  """The no-model reference that answers ``option`` (one option for every
  client, or one per client ``[N]``) to every example, scored like
  :func:`classification_metrics`. For an F1 task with ``option = positive``
  ("every window is anomalous") this is the trivial F1 baseline: ``2p /
  (1 + p)`` on a client whose test split is a share ``p`` positive, which a
  model that only learned to say "yes" ties."""
  labels = np.asarray(labels)
  option = np.asarray(option, np.int64).reshape(-1, 1)
  preds = np.broadcast_to(option, labels.shape)
  return classification_metrics(preds, labels, valid, metric, positive)


def reference_row(key: str, task) -> str:
  """The console row of a no-model reference (``results.json`` key)."""
  positive = positive_option(task)
  return {'majority': 'majority (no model)',
          'always_positive': (f'always "{task.options[positive]}" (no model)'
                              if positive is not None else key),
          'by_system': 'label by system (no model)',
          'nearest_message': 'nearest training message (no model)'}[key]


def references(task, part, train_label_counts,
               tests) -> dict[str, tuple[str, np.ndarray]]:
  """The answers that need no model, ``{key in results.json: (console row,
  preds [N, M])}`` on the ``tests`` OptionArrays of ``part.test``:

  * ``majority``: each client answers its training split's majority label
    (``train_label_counts [N, O]``);
  * ``always_positive`` (F1 tasks): always the positive class, the trivial
    F1 baseline;
  * ``by_system``: the majority training label of the example's system of
    origin (:func:`fdlora_jax.data.references.by_system`);
  * ``nearest_message``: the label of the same message, else template, in
    the training data (:func:`~fdlora_jax.data.references.nearest_message`).

  The last two are fit on all clients' training examples together.
  """
  from fdlora_jax.data import references as refs  # pylint: disable=g-import-not-at-top
  labels = np.asarray(tests.labels)
  n = labels.shape[0]
  positive = positive_option(task)
  row = lambda key: reference_row(key, task)
  out = {'majority': (row('majority'), np.broadcast_to(
      np.asarray(train_label_counts).argmax(-1)[:, None], labels.shape))}
  if positive is not None:
    out['always_positive'] = (row('always_positive'),
                              np.full(labels.shape, positive))
  train = [task.examples[j] for idx in part.train for j in idx]
  if train:
    for key, rule in (('by_system', refs.by_system),
                      ('nearest_message', refs.nearest_message)):
      preds = np.zeros(labels.shape, np.int64)
      for i in range(n):
        test = [task.examples[j] for j in part.test[i]]
        if test:
          preds[i, :len(test)] = rule(train, test)
      out[key] = (row(key), preds)
  return out


def format_table(results: dict[str, dict], metric_names: Sequence[str],
                 scale: float = 100.0, digits: int = 2) -> str:
  """A plain-text table: one row per model, ``mean±std`` of each metric,
  then the first metric for every client (``c0``, ``c1``, ...).

  Args:
    results: ``{'personalized': classification_metrics(...), ...}``.
    metric_names: e.g. ``['f1', 'accuracy']``.
    scale: values are multiplied by this (100: percentages, as in papers).
  """
  metric_names = list(metric_names)
  if not metric_names:
    raise ValueError('format_table needs at least one metric name')
  num_clients = max(len(r['per_client']) for r in results.values())
  header = (['model'] + metric_names
            + [f'{metric_names[0]} c{i}' for i in range(num_clients)])
  fmt = f'{{:.{digits}f}}'
  rows = []
  for name, r in results.items():
    for k in metric_names:
      if k not in r['mean']:
        raise ValueError(f'results[{name!r}] has no metric {k!r} (has '
                         f'{sorted(r["mean"])})')
    row = [name] + [f'{fmt.format(r["mean"][k] * scale)}'
                    f'±{fmt.format(r["std"][k] * scale)}'
                    for k in metric_names]
    row += [fmt.format(c[metric_names[0]] * scale) if c['n'] else '-'
            for c in r['per_client']]
    row += [''] * (len(header) - len(row))
    rows.append(row)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda cells: '  '.join(str(c).ljust(w) if i == 0 else
                                 str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells,
                                                                widths)))
  out = [line(header), '  '.join('-' * w for w in widths)]
  out += [line(r) for r in rows]
  return '\n'.join(out)


# ---------------------------------------------------------------------------
# Generation (optional path: answers as free text)
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def greedy_generate(model, base: PyTree, lora: Optional[PyTree],
                    prompt_tokens, prompt_mask, max_new_tokens: int,
                    eos_id: int = -1, pad_id: int = 0):
  """Greedy decoding with a KV cache: ``[B, max_new_tokens]`` new tokens.

  One forward over the prompt fills the cache (``Llama(decode=True)``), then
  every new token costs a one-token forward against the cache, inside a
  ``lax.fori_loop``.

  Args:
    prompt_tokens: int ``[B, T0]``, LEFT-padded so every prompt ends at
      ``T0 - 1`` (rotary positions count real tokens only).
    prompt_mask: ``[B, T0]``, 1 on real prompt tokens.
    lora: one adapter (no client axis) or None; vmap for many clients.
    eos_id: after it a row emits ``pad_id``; -1 disables stopping.
  """
  b, t0 = prompt_tokens.shape
  decoder = model.clone(decode=True)
  cache = empty_cache(model, b, t0 + max_new_tokens)
  variables = {'params': base} if lora is None else {'params': base,
                                                     'lora': lora}

  def forward(cache, tokens, mask, positions):
    logits, updated = decoder.apply({**variables, 'cache': cache}, tokens,
                                    mask, positions, mutable=['cache'])
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), updated['cache']

  positions = positions_from_mask(prompt_mask)
  nxt, cache = forward(cache, prompt_tokens, prompt_mask, positions)
  pos = positions[:, -1] + 1

  def step(i, carry):
    cache, nxt, pos, done, out = carry
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, i].set(nxt)
    done = done | (nxt == eos_id)
    following, cache = forward(cache, nxt[:, None], jnp.ones((b, 1),
                                                             jnp.int32),
                               pos[:, None])
    return cache, following, pos + 1, done, out

  carry = (cache, nxt, pos, jnp.zeros((b,), bool),
           jnp.zeros((b, max_new_tokens), jnp.int32))
  return jax.lax.fori_loop(0, max_new_tokens, step, carry)[-1]


def parse_yes_no(text: str) -> int:
  """0 (normal) if the first word is 'no', else 1 (anomalous).

  This is how the FDLoRA authors read generated answers for log anomaly
  detection; case and surrounding punctuation are ignored.
  """
  words = text.strip().split()
  first = words[0].strip('.,:;!?"\'()[]').lower() if words else ''
  return 0 if first == 'no' else 1


def parse_option(text: str, options: Sequence[str]) -> int:
  """Index of the option the first word names (case-insensitive), else -1."""
  words = text.strip().split()
  first = words[0].strip('.,:;!?"\'()[]').lower() if words else ''
  lowered = [o.strip().lower() for o in options]
  return lowered.index(first) if first in lowered else -1


def prompts_from_options(arrays) -> tuple[np.ndarray, np.ndarray]:
  """LEFT-padded prompts ``[N, M, T]`` and masks from scoring arrays (the
  tokens of option 0 before its first option token)."""
  tokens = np.asarray(_field(arrays, 'tokens'))[:, :, 0]
  prompt = ((np.asarray(_field(arrays, 'attention_mask'))[:, :, 0] > 0)
            & (np.asarray(_field(arrays, 'option_mask'))[:, :, 0] == 0))
  lengths = prompt.sum(-1)
  width = int(lengths.max(initial=1))
  out = np.zeros(tokens.shape[:2] + (width,), np.int32)
  mask = np.zeros_like(out)
  for idx in np.ndindex(*tokens.shape[:2]):
    n = lengths[idx]
    if n:
      out[idx][width - n:] = tokens[idx][:n]
      mask[idx][width - n:] = 1
  return out, mask


def _generate_mixed(gen, model, base, mix, prompts, masks):
  """``gen`` (clients vmapped, one adapter each) for an InstanceMix: every
  prompt of ``[N, C, T]`` (left-padded, so it ends at ``T - 1``) gets its own
  adapter and decodes as a batch of one."""
  n, c, t = prompts.shape
  flat_p, flat_k = prompts.reshape(n * c, 1, t), masks.reshape(n * c, 1, t)
  rows = jax.tree.map(lambda x: x[jnp.repeat(jnp.arange(n), c)], mix)
  adapters, _ = instance_adapters(model, base, rows, flat_p[:, 0],
                                  flat_k[:, 0], jnp.full((n * c,), t - 1))
  out = gen(adapters, flat_p, flat_k)                           # [NC, 1, new]
  return np.asarray(out).reshape(n, c, -1)


def generated_predictions(model, base: PyTree, lora: Optional[PyTree],
                          arrays, tokenizer, options: Sequence[str],
                          max_new_tokens: int = 4, chunk: int = 16,
                          yes_no: bool = True) -> tuple[np.ndarray, list]:
  """Predictions ``[N, M]`` from greedy answers (the authors' evaluation).

  Every client generates for all its test prompts in one vmapped, KV-cached
  decode per chunk; the text is read with :func:`parse_yes_no` (logs: first
  word 'no' is normal, anything else anomalous; needs options ('no', 'yes'))
  or :func:`parse_option`. Returns the predictions and the texts.
  """
  prompts, masks = prompts_from_options(arrays)
  n, m, _ = prompts.shape
  chunk = min(chunk, m)
  padded = -(-m // chunk) * chunk
  pad = lambda x: np.pad(x, [(0, 0), (0, padded - m), (0, 0)])
  prompts, masks = pad(prompts), pad(masks)
  masks[:, m:, -1] = 1  # padded rows: one dummy token, output ignored
  gen = jax.vmap(lambda lo, p, k: greedy_generate(
      model, base, lo, p, k, max_new_tokens, tokenizer.eos_token_id,
      tokenizer.pad_token_id), in_axes=(None if lora is None else 0, 0, 0))
  if isinstance(lora, lora_lib.InstanceMix):
    gen = functools.partial(_generate_mixed, gen, model, base)
  outs = [np.asarray(gen(lora, prompts[:, s:s + chunk], masks[:, s:s + chunk]))
          for s in range(0, padded, chunk)]
  tokens = np.concatenate(outs, axis=1)[:, :m]
  texts = [[tokenizer.decode(row, skip_special_tokens=True) for row in client]
           for client in tokens]
  if yes_no:
    index = {0: list(options).index('no'), 1: list(options).index('yes')}
    preds = [[index[parse_yes_no(t)] for t in client] for client in texts]
  else:
    preds = [[parse_option(t, options) for t in client] for client in texts]
  return np.asarray(preds, np.int32).reshape(n, m), texts


# ---------------------------------------------------------------------------
# A task's adapters, scored as the config says (c.eval)
# ---------------------------------------------------------------------------
def adapter_predictions(model, base: PyTree, lora_n: Optional[PyTree], tests,
                        task, eval_cfg, tokenizer
                        ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """``(preds [N, M], scores [N, M, O] or None)`` of adapters ``lora_n [N,
  ...]`` (None: the base) on the ``tests`` OptionArrays, by option scores or
  by greedy answers (``eval_cfg.mode``; no scores then)."""
  if eval_cfg.mode == 'generate':
    preds, _ = generated_predictions(
        model, base, lora_n, tests, tokenizer, task.options,
        eval_cfg.max_new_tokens, eval_cfg.chunk, yes_no=task.metric == 'f1')
    return preds, None
  scores = option_scores(model, base, lora_n, tests, chunk=eval_cfg.chunk,
                         normalize=eval_cfg.normalize)
  return np.asarray(scores).argmax(-1), np.asarray(scores)


def evaluate_adapters(model, base: PyTree, lora_n: Optional[PyTree], tests,
                      task, eval_cfg, tokenizer) -> dict:
  """Per-client and mean/std metrics of :func:`adapter_predictions`."""
  preds, _ = adapter_predictions(model, base, lora_n, tests, task, eval_cfg,
                                 tokenizer)
  return classification_metrics(preds, tests.labels, tests.valid,
                                task.metric, positive_option(task))


def positive_option(task) -> Optional[int]:
  """The F1 task's positive class ('yes' = anomalous), else None."""
  return task.options.index('yes') if task.metric == 'f1' else None


def metric_names(task) -> tuple[str, ...]:
  """The metrics a task's table shows, its own first."""
  if task.metric == 'f1':
    return ('f1', 'precision', 'recall', 'accuracy')
  # micro-F1 equals accuracy for single-label tasks (ChemProt, RCT).
  return ('micro_f1', 'accuracy') if task.metric == 'micro_f1' else (
      'accuracy',)
