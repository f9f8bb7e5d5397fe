"""Tokenization for training (SFT) and for scoring answer options.

The sequence for an example is, at the token level,

  tokens(prompt)  +  tokens(answer_prefix + answer)  +  [eos]

where `tokens(prompt)` is encoded with the tokenizer's special tokens (so a
LLaMA-style <s> comes first) and the answer part without them. The two parts
are encoded separately and concatenated, so the answer's tokens are the same
whatever the prompt ends with; training (loss on the answer tokens and the
eos) and option scoring (log-likelihood of `tokens(answer_prefix + option)`
after the same prompt tokens) see exactly the same prompt and answer tokens.
`answer_prefix` is c.data.answer_prefix, resolved by :func:`answer_prefix`:
'auto' (the default) is ' ' for a plain prompt ("### Response: yes") and ''
with the chat template, where the answer opens the assistant's turn
("<|im_start|>assistant\nyes"): an instruct model starts a turn with "yes" /
"Yes", almost never with " yes" (SmolLM2-135M-Instruct: p(" yes") < 1e-4
against p("yes") = 0.02 after a LogHub prompt), so a leading space makes the
first steps learn the format instead of the answer.

Truncation: when prompt + longest option + eos exceeds c.data.max_length,
whole log lines are dropped from the END of the window (the kept lines are
the window's first ones, still consecutive and in time order); a window
whose first line alone is too long keeps that line's first words (it never
loses all of its text); the template, the question and the response marker
are never cut. Texts without lines
(medical) lose words from the end of their text (the context, as the
question comes first). The same truncated prompt is used for every option of
an example. A log window keeps its label when lines are cut, so a cut
anomalous line makes a noisy label: the number of truncated examples is
logged and kept in `truncated`.

Sequences are right-padded with the pad token to a length bucket
(c.data.length_buckets, plus max_length), so jitted steps see few shapes.

k-shot prompts (`encode_options(..., demos=...)`): each evaluation prompt is
preceded by demonstrations from the client's own training split, each
rendered as `build_prompt(demo) + plain prefix + demo.answer + '\\n\\n'`,
in order, all in one text encoded like a plain prompt (so one <s> first).
Every example, asked or shown, is first cut alone as above (so the question
is the zero-shot prompt's, and a demonstration is the text the model trains
on); when the whole exceeds the k-shot token budget (`context_length`,
default c.data.max_length), demonstrations are dropped from the end until it
fits. `demonstrations()` draws them.
"""

from collections.abc import Sequence
import dataclasses

from absl import logging
import ml_collections
import numpy as np

from fdlora_jax.data.examples import Example
from fdlora_jax.data.examples import Task
from fdlora_jax.data.examples import build_prompt
from fdlora_jax.data.examples import with_text
from fdlora_jax.errors import ConfigError
from fdlora_jax.errors import DataError

_DEMO_STREAM = 7  # seeds demonstrations() apart from partition's draws


@dataclasses.dataclass
class ClientArrays:
  """SFT examples of every client, dense, right-padded.

  Attributes:
    tokens: int32 [N, M, L]; M = most examples over clients; padded rows are
      all pad.
    loss_mask: float32 [N, M, L], 1 on the answer tokens and the eos.
    attention_mask: int32 [N, M, L], 1 on real tokens.
    lengths: int32 [N, M], real tokens per example (0 for padded rows).
    counts: int32 [N], real examples per client.
    truncated: how many examples had lines or words cut.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  lengths: np.ndarray
  counts: np.ndarray
  truncated: int = 0


@dataclasses.dataclass
class OptionArrays:
  """Every example with each answer option, for log-likelihood scoring.

  Attributes:
    tokens: int32 [N, M, O, L], prompt + option_o (no eos).
    option_mask: float32 [N, M, O, L], 1 on the option's tokens.
    attention_mask: int32 [N, M, O, L].
    labels: int32 [N, M], correct option index (0 for padded rows).
    valid: bool [N, M], False for padded rows.
    truncated: how many examples had lines or words cut.
    demos_used: int32 [N, M], demonstrations placed before each prompt (0
      without demos, and for padded rows); None given means all zeros.
  """
  tokens: np.ndarray
  option_mask: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  valid: np.ndarray
  truncated: int = 0
  demos_used: np.ndarray | None = None

  def __post_init__(self):
    if self.demos_used is None:
      self.demos_used = np.zeros(np.shape(self.labels), np.int32)


def bucket_length(n: int, buckets: Sequence[int], max_length: int) -> int:
  """The smallest of `buckets` (and max_length) that holds n tokens."""
  for b in sorted(set(buckets) | {max_length}):
    if b >= n:
      return b
  raise ConfigError(f'config.data.max_length={max_length}: a sequence of {n} '
                    'tokens does not fit')


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
  if not texts:
    return []
  return tokenizer(texts, add_special_tokens=special)['input_ids']


CHAT_TEMPLATE_MODES = ('auto', 'on', 'off')


def uses_chat_template(tokenizer, data_cfg: ml_collections.ConfigDict) -> bool:
  """``data.chat_template``: 'auto' (the tokenizer's template when it has
  one), 'on' (required) or 'off'."""
  mode = data_cfg.get('chat_template', 'off')
  mode = {True: 'on', False: 'off'}.get(mode, mode)
  if mode not in CHAT_TEMPLATE_MODES:
    raise ConfigError(f'config.data.chat_template={mode!r}: choose from '
                      f'{CHAT_TEMPLATE_MODES}')
  has = bool(getattr(tokenizer, 'chat_template', None))
  if mode == 'on' and not has:
    raise ConfigError("config.data.chat_template='on': the tokenizer has no "
                      'chat template')
  return has and mode != 'off'


def _prompt_ids(tokenizer, texts: list[str],
                data_cfg: ml_collections.ConfigDict) -> list[list[int]]:
  """Token ids of prompts: as plain text with the tokenizer's special tokens
  (bos), or, with the chat template (:func:`uses_chat_template`), as one
  user turn followed by the assistant's turn (the template adds its own
  special tokens)."""
  if not uses_chat_template(tokenizer, data_cfg):
    return _ids(tokenizer, texts, True)
  chats = [tokenizer.apply_chat_template(
      [{'role': 'user', 'content': t}], tokenize=False,
      add_generation_prompt=True) for t in texts]
  return _ids(tokenizer, chats, False)


PLAIN_ANSWER_PREFIX = ' '   # "### Response:" + " yes"


def plain_answer_prefix(data_cfg: ml_collections.ConfigDict) -> str:
  """What joins a prompt and its answer in plain text (a k-shot
  demonstration, a prompt without the chat template)."""
  prefix = data_cfg.answer_prefix
  return PLAIN_ANSWER_PREFIX if prefix == 'auto' else prefix


def answer_prefix(tokenizer, data_cfg: ml_collections.ConfigDict) -> str:
  """c.data.answer_prefix as the answer tokens see it: 'auto' is '' when
  prompts go through the chat template (the answer opens the assistant's
  turn), else ' '; any other value is used as it is."""
  if data_cfg.answer_prefix == 'auto' and uses_chat_template(tokenizer,
                                                             data_cfg):
    return ''
  return plain_answer_prefix(data_cfg)


def option_ids(tokenizer, task: Task,
               data_cfg: ml_collections.ConfigDict) -> np.ndarray | None:
  """``[O]`` the first token of each answer option, or None if two options
  share it."""
  prefix = answer_prefix(tokenizer, data_cfg)
  first = [tokenizer(prefix + o, add_special_tokens=False)['input_ids'][0]
           for o in task.options]
  return np.asarray(first, np.int32) if len(set(first)) == len(first) \
      else None


def _answer_ids(tokenizer, options: tuple[str, ...],
                data_cfg: ml_collections.ConfigDict) -> list[list[int]]:
  prefix = answer_prefix(tokenizer, data_cfg)
  return _ids(tokenizer, [prefix + o for o in options], False)


def _shorter(example: Example, k: int) -> Example:
  if example.lines:
    return with_text(example, '\n'.join(example.lines[:k]),
                     lines=example.lines[:k])
  return with_text(example, ' '.join(example.text.split(' ')[:k]))


def _largest_fit(tokenizer, example: Example, lo: int, budget: int,
                 data_cfg: ml_collections.ConfigDict
                 ) -> tuple[Example, list[int]] | None:
  """`example` cut to the most units (lines, else words), at least `lo`,
  whose prompt fits `budget` tokens, and that prompt's ids; None if even
  `lo` units do not fit (binary search; the whole example does not fit)."""
  n_units = len(example.lines) if example.lines else len(
      example.text.split(' '))
  hi, best = n_units - 1, None
  while lo <= hi:  # largest k whose prompt fits
    k = (lo + hi) // 2
    short = _shorter(example, k)
    ids = _prompt_ids(tokenizer, [build_prompt(short, data_cfg.template,
                                               data_cfg)], data_cfg)[0]
    if len(ids) <= budget:
      best, lo = (short, ids), k + 1
    else:
      hi = k - 1
  return best


def _cut(tokenizer, example: Example, budget: int,
         data_cfg: ml_collections.ConfigDict) -> tuple[Example, list[int]]:
  """`example` cut to the most whole lines (words) whose prompt fits
  `budget` tokens, and that prompt's ids. A window keeps at least its first
  line: when that alone is too long, it keeps the line's first words (a
  window never loses all of its text)."""
  best = _largest_fit(tokenizer, example, 1 if example.lines else 0, budget,
                      data_cfg)
  if best is None and example.lines:
    first = example.lines[0]
    words = _largest_fit(tokenizer, with_text(example, first, lines=()), 1,
                         budget, data_cfg)
    if words is not None:
      short, ids = words
      best = with_text(short, short.text, lines=(short.text,)), ids
  if best is None:
    raise ConfigError(
        f'config.data.max_length={data_cfg.max_length}: the template and '
        f'question alone do not fit with the answer ({example.source} '
        'example)')
  return best


def _each_cut(tokenizer, examples: Sequence[Example], budget: int,
              data_cfg: ml_collections.ConfigDict
              ) -> tuple[list[Example], list[list[int]]]:
  """Every example alone, cut where its prompt exceeds `budget` tokens (the
  same object where it fits), and its prompt ids."""
  out = list(examples)
  prompts = _prompt_ids(tokenizer, [build_prompt(e, data_cfg.template,
                                                 data_cfg)
                                    for e in examples], data_cfg)
  for j, e in enumerate(examples):
    if len(prompts[j]) > budget:
      out[j], prompts[j] = _cut(tokenizer, e, budget, data_cfg)
  return out, prompts


def encode_prompts(tokenizer, task: Task, indices: np.ndarray,
                   data_cfg: ml_collections.ConfigDict
                   ) -> tuple[list[list[int]], list[list[int]], int]:
  """(prompt ids per example, answer ids per option, number truncated)."""
  answers = _answer_ids(tokenizer, task.options, data_cfg)
  budget = data_cfg.max_length - max(len(a) for a in answers) - 1  # eos
  examples = [task.examples[i] for i in indices]
  _check_options(task, examples)
  cut, prompts = _each_cut(tokenizer, examples, budget, data_cfg)
  truncated = sum(c is not e for c, e in zip(cut, examples))
  return prompts, answers, truncated


def _check_options(task: Task, examples: Sequence[Example]) -> None:
  for e in examples:
    if e.options != task.options:
      raise DataError(f'{e.source} example has options {e.options}, the task '
                      f'{task.options}')


def _demo_text(example: Example, data_cfg: ml_collections.ConfigDict) -> str:
  return (build_prompt(example, data_cfg.template, data_cfg) +
          plain_answer_prefix(data_cfg) + example.answer + '\n\n')


def demonstrations(train_indices_per_client: Sequence[np.ndarray], k: int,
                   seed: int) -> list[np.ndarray]:
  """Per client, k of its own training examples to show before each prompt.

  Drawn without replacement (all of them, shuffled, when a client has fewer
  than k) by a generator seeded with (seed, client) on a stream of its own,
  so the same seed gives the same demonstrations whatever else is drawn.

  Args:
    train_indices_per_client: per client, its training indices into
      task.examples (Partition.train).
    k: demonstrations per client (>= 0).
    seed: the run's seed.

  Returns:
    Per client, int64 [min(k, n_train)] example indices, in the order they
    are shown.
  """
  if k < 0:
    raise ValueError(f'k-shot: k={k} must be >= 0')
  out = []
  for client, train in enumerate(train_indices_per_client):
    train = np.asarray(train, np.int64)
    rng = np.random.default_rng([seed, _DEMO_STREAM, client])
    out.append(rng.choice(train, min(k, len(train)), replace=False)
               if len(train) else np.zeros(0, np.int64))
  return out


def encode_prompts_with_demos(
    tokenizer, task: Task, per_client_indices: Sequence[np.ndarray],
    demos: Sequence[Sequence[int]], data_cfg: ml_collections.ConfigDict,
    context_length: int | None = None
) -> tuple[list[list[int]], list[list[int]], int, list[int]]:
  """(prompt ids, answer ids, number truncated, demos used) per example.

  Examples are in client order, as in encode_options. Every example, asked
  or shown, is first cut exactly as encode_prompts cuts it alone (to
  c.data.max_length), so the question is the zero-shot prompt's and each
  demonstration is the text the model trains on. Client c's prompts are
  preceded by the examples `demos[c]` (an example is never its own
  demonstration); demonstrations are dropped from the end until the whole
  prompt fits `context_length` tokens (None: c.data.max_length) with the
  longest answer and eos. `truncated` counts the questions cut.
  """
  if len(demos) != len(per_client_indices):
    raise ValueError(f'demos has {len(demos)} clients, per_client_indices '
                     f'{len(per_client_indices)}')
  total = data_cfg.max_length if context_length is None else context_length
  if total < data_cfg.max_length:
    raise ConfigError(f'k-shot context length {total} is shorter than '
                      f'config.data.max_length={data_cfg.max_length}')
  answers = _answer_ids(tokenizer, task.options, data_cfg)
  tail = max(len(a) for a in answers) + 1  # eos
  flat = [int(i) for idx in per_client_indices
          for i in np.asarray(idx, np.int64).tolist()]
  shown = sorted({int(j) for d in demos for j in d})
  _check_options(task, [task.examples[i] for i in flat + shown])
  # Each example alone, cut as encode_prompts cuts it.
  unique = sorted(set(flat) | set(shown))
  cut = dict(zip(unique, _each_cut(
      tokenizer, [task.examples[i] for i in unique],
      data_cfg.max_length - tail, data_cfg)[0]))
  truncated = sum(cut[i] is not task.examples[i] for i in flat)
  owns, shots = [], []  # per example: own prompt, demonstration texts
  k = 0
  for c, idx in enumerate(per_client_indices):
    mine = [int(j) for j in demos[c]]
    rendered = {j: _demo_text(cut[j], data_cfg) for j in mine}
    for _ in range(len(idx)):
      i = flat[k]
      k += 1
      owns.append(build_prompt(cut[i], data_cfg.template, data_cfg))
      shots.append([rendered[j] for j in mine if j != i])
  prompts = [None] * len(owns)
  used = [len(s) for s in shots]
  todo = list(range(len(owns)))
  while todo:  # one batched encode per number of demonstrations dropped
    texts = [''.join(shots[j][:used[j]]) + owns[j] for j in todo]
    retry = []
    for j, ids in zip(todo, _prompt_ids(tokenizer, texts, data_cfg)):
      if len(ids) <= total - tail or used[j] == 0:
        prompts[j] = ids
      else:
        used[j] -= 1
        retry.append(j)
    todo = retry
  dropped = sum(len(s) - u for s, u in zip(shots, used))
  if dropped:
    logging.info('k-shot: %d demonstrations dropped from %d prompts to fit '
                 '%d tokens', dropped, len(prompts), total)
  return prompts, answers, truncated, used


def _warn(truncated: int, total: int, data_cfg) -> None:
  if truncated:
    logging.warning('%d of %d examples cut to c.data.max_length=%d',
                    truncated, total, data_cfg.max_length)


def encode_clients(tokenizer, task: Task,
                   per_client_indices: Sequence[np.ndarray],
                   data_cfg: ml_collections.ConfigDict) -> ClientArrays:
  """SFT arrays: prompt + correct answer + eos, loss on answer and eos.

  Args:
    tokenizer: a Hugging Face tokenizer with pad and eos tokens.
    task: the task.
    per_client_indices: per client, indices into task.examples.
    data_cfg: `c.data` (template, questions, answer_prefix, max_length,
      length_buckets).

  Returns:
    ClientArrays with L = the smallest bucket that holds the longest example.
  """
  n = len(per_client_indices)
  counts = np.asarray([len(ix) for ix in per_client_indices], np.int32)
  flat = np.concatenate([np.asarray(ix, np.int64) for ix in
                         per_client_indices]) if n else np.zeros(0, np.int64)
  prompts, answers, truncated = encode_prompts(tokenizer, task, flat, data_cfg)
  eos = tokenizer.eos_token_id
  seqs = [(p, answers[task.examples[i].label] + [eos])
          for p, i in zip(prompts, flat)]
  longest = max([len(p) + len(a) for p, a in seqs], default=1)
  length = bucket_length(longest, data_cfg.length_buckets,
                         data_cfg.max_length)
  m = max(int(counts.max(initial=0)), 1)
  tokens = np.full((n, m, length), tokenizer.pad_token_id, np.int32)
  loss_mask = np.zeros((n, m, length), np.float32)
  lengths = np.zeros((n, m), np.int32)
  k = 0
  for c in range(n):
    for row in range(counts[c]):
      p, a = seqs[k]
      k += 1
      tokens[c, row, :len(p) + len(a)] = p + a
      loss_mask[c, row, len(p):len(p) + len(a)] = 1.0
      lengths[c, row] = len(p) + len(a)
  attention = (np.arange(length) < lengths[..., None]).astype(np.int32)
  _warn(truncated, len(flat), data_cfg)
  return ClientArrays(tokens, loss_mask, attention, lengths, counts,
                      truncated)


def encode_options(tokenizer, task: Task,
                   per_client_indices: Sequence[np.ndarray],
                   data_cfg: ml_collections.ConfigDict,
                   demos: Sequence[Sequence[int]] | None = None,
                   context_length: int | None = None) -> OptionArrays:
  """Scoring arrays: for each example, prompt + each option (no eos).

  Args:
    tokenizer: a Hugging Face tokenizer with a pad token.
    task: the task.
    per_client_indices: per client, indices into task.examples.
    data_cfg: `c.data`.
    demos: None (zero-shot), or per client a list of example indices (e.g.
      from `demonstrations`) shown, in order, before each of its prompts;
      trailing ones are dropped where the prompt would not fit max_length.

  Returns:
    OptionArrays; `demos_used` says how many demonstrations each prompt got.
  """
  n, o = len(per_client_indices), len(task.options)
  counts = [len(ix) for ix in per_client_indices]
  flat = np.concatenate([np.asarray(ix, np.int64) for ix in
                         per_client_indices]) if n else np.zeros(0, np.int64)
  if demos is None:
    prompts, answers, truncated = encode_prompts(tokenizer, task, flat,
                                                 data_cfg)
    used = [0] * len(prompts)
  else:
    prompts, answers, truncated, used = encode_prompts_with_demos(
        tokenizer, task, per_client_indices, demos, data_cfg, context_length)
  longest = max([len(p) for p in prompts], default=0) + max(
      len(a) for a in answers)
  if demos is not None and longest > data_cfg.max_length:
    # k-shot prompts run past the buckets: the longest, up to 64 tokens
    # more (the tokens after each client's cached start are what runs).
    length = min(max(data_cfg.max_length, context_length or 0),
                 -(-longest // 64) * 64)
  else:
    length = bucket_length(longest, data_cfg.length_buckets,
                           data_cfg.max_length)
  m = max(max(counts, default=0), 1)
  tokens = np.full((n, m, o, length), tokenizer.pad_token_id, np.int32)
  option_mask = np.zeros((n, m, o, length), np.float32)
  attention = np.zeros((n, m, o, length), np.int32)
  labels = np.zeros((n, m), np.int32)
  valid = np.zeros((n, m), bool)
  demos_used = np.zeros((n, m), np.int32)
  k = 0
  for c in range(n):
    for row in range(counts[c]):
      p = prompts[k]
      labels[c, row] = task.examples[flat[k]].label
      valid[c, row] = True
      demos_used[c, row] = used[k]
      k += 1
      for j, a in enumerate(answers):
        tokens[c, row, j, :len(p) + len(a)] = p + a
        option_mask[c, row, j, len(p):len(p) + len(a)] = 1.0
        attention[c, row, j, :len(p) + len(a)] = 1
  _warn(truncated, len(flat), data_cfg)
  return OptionArrays(tokens, option_mask, attention, labels, valid,
                      truncated, demos_used)


def example_order(seed: int, client: int, count: int, step0: int,
                  num_steps: int, batch_size: int) -> np.ndarray:
  """[num_steps, batch_size] example rows of one client.

  Position p = step * batch_size + b walks through epochs; epoch e is the
  permutation drawn from (seed, client, e). So the order is a pure function
  of (seed, client, global step): a resumed run sees the same data.
  """
  pos = ((step0 + np.arange(num_steps))[:, None] * batch_size +
         np.arange(batch_size)[None, :])
  epoch, within = np.divmod(pos, count)
  rows = np.empty_like(pos)
  for e in np.unique(epoch):
    perm = np.random.default_rng([seed, client, int(e)]).permutation(count)
    rows[epoch == e] = perm[within[epoch == e]]
  return rows


def sample_steps(arrays: ClientArrays, step0: int, num_steps: int,
                 batch_size: int, seed: int,
                 buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """Batches for `num_steps` local steps of every client.

  Args:
    arrays: from encode_clients.
    step0: the global step of the first batch.
    num_steps: K.
    batch_size: B.
    seed: the data-order seed.
    buckets: length buckets (c.data.length_buckets).

  Returns:
    tokens, loss_mask, attention_mask: [K, N, B, L_bucket], L_bucket the
    smallest bucket (or the arrays' length) holding the longest example
    drawn; valid: float32 [K, N, B], 0 where a client has no examples.
  """
  n, _, length = arrays.tokens.shape
  rows = np.zeros((num_steps, n, batch_size), np.int64)
  valid = np.zeros((num_steps, n, batch_size), np.float32)
  for c in range(n):
    if arrays.counts[c] > 0:
      rows[:, c] = example_order(seed, c, int(arrays.counts[c]), step0,
                                 num_steps, batch_size)
      valid[:, c] = 1.0
  clients = np.arange(n)[None, :, None]
  longest = int((arrays.lengths[clients, rows] * valid).max(initial=1))
  size = bucket_length(max(longest, 1), buckets, length)
  pick = lambda x: x[clients, rows][..., :size]
  return {'tokens': pick(arrays.tokens), 'loss_mask': pick(arrays.loss_mask),
          'attention_mask': pick(arrays.attention_mask), 'valid': valid}


def tokenizer_texts(task: Task, data_cfg: ml_collections.ConfigDict
                    ) -> list[str]:
  """The run's own text (every prompt, every option) to train a tokenizer."""
  texts = [build_prompt(e, data_cfg.template, data_cfg)
           for e in task.examples]
  prefix = plain_answer_prefix(data_cfg)
  return texts + [prefix + o for o in task.options]
