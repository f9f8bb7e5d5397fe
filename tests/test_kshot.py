"""k-shot evaluation prompts on the real BGL sample in ../shared/data."""

import dataclasses
import pathlib

import numpy as np
import pytest

from configs import common
from fdlora_jax import data
from fdlora_jax import tokenizer as tokenizer_lib
from fdlora_jax.errors import ConfigError

SHARED = pathlib.Path(__file__).parents[1].parent / 'shared' / 'data'
LOGHUB = SHARED / 'loghub'
K = 3

pytestmark = pytest.mark.skipif(not SHARED.is_dir(),
                                reason=f'{SHARED} is absent')


def bgl_cfg(**data_fields):
  c = common.logs_data(common.base_config())
  # 25-line windows: 80 windows whose texts are all distinct and none inside
  # another, so "which examples' texts are in the prompt" is well defined;
  # up to ~3000 tokens each, so K + 1 of them always fit in max_length.
  c.data.update(dict(dir=str(LOGHUB), files='BGL_2k.log', window_size=25,
                     window_stride=25, max_length=16384,
                     length_buckets=(64, 128, 256)))
  c.data.update(data_fields)
  return c.data


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = bgl_cfg()
  task = data.load_task(cfg, 0)
  texts = [e.text for e in task.examples]
  assert len(task.examples) == 80
  assert not any(a in b for i, a in enumerate(texts)
                 for j, b in enumerate(texts) if i != j)
  tok = tokenizer_lib.embedded_tokenizer(
      data.tokenizer_texts(task, cfg), 512, str(tmp_path_factory.mktemp('t')))
  part = data.partition(task, 2, cfg, seed=0)
  return task, tok, part


def _prompt(tok, arrays, c, row):
  """The decoded prompt (before the option) of one scoring row."""
  n = int(arrays.attention_mask[c, row, 0].sum() -
          arrays.option_mask[c, row, 0].sum())
  return tok.decode(arrays.tokens[c, row, 0, :n], skip_special_tokens=True)


def _render(task, j, cfg):
  e = task.examples[j]
  return (data.build_prompt(e, cfg.template, cfg) +
          data.plain_answer_prefix(cfg) + e.answer + '\n\n')


def test_demonstrations_are_own_training_examples_seeded():
  train = [np.arange(0, 10), np.arange(10, 12), np.zeros(0, np.int64)]
  a = data.demonstrations(train, K, seed=0)
  assert [len(d) for d in a] == [K, 2, 0]  # fewer when a client has fewer
  for d, t in zip(a, train):
    assert len(set(d.tolist())) == len(d) and set(d.tolist()) <= set(t)
  b = data.demonstrations(train, K, seed=0)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  others = [data.demonstrations(train, K, seed=s)[0] for s in range(1, 6)]
  assert any(not np.array_equal(a[0], o) for o in others)
  # A client's draw depends on (seed, client) only, not on other clients.
  alone = data.demonstrations(train[:1], K, seed=0)
  assert np.array_equal(alone[0], a[0])


def test_prompt_holds_exactly_k_own_training_examples(setup):
  task, tok, part = setup
  cfg = bgl_cfg()
  demos = data.demonstrations(part.train, K, seed=0)
  arrays = data.encode_options(tok, task, part.test, cfg, demos=demos)
  assert arrays.truncated == 0
  for c in range(part.num_clients):
    assert len(demos[c]) == K and set(demos[c]) <= set(part.train[c])
    other = 1 - c
    for row, i in enumerate(part.test[c]):
      prompt = _prompt(tok, arrays, c, row)
      shown = [j for j in part.train[c] if task.examples[j].text in prompt]
      assert sorted(shown) == sorted(demos[c].tolist()) and len(shown) == K
      tests = [j for j in part.test[c] if task.examples[j].text in prompt]
      assert tests == [i]
      assert not any(task.examples[j].text in prompt for j in
                     np.concatenate([part.train[other], part.test[other]]))
      assert arrays.demos_used[c, row] == K
      # In order, each as prompt + answer, then the example's own prompt.
      assert prompt == ''.join(_render(task, j, cfg) for j in demos[c]) + (
          data.build_prompt(task.examples[i], cfg.template, cfg))
    assert np.all(arrays.demos_used[c, len(part.test[c]):] == 0)


def test_context_length_drops_demos_not_the_question(setup):
  task, tok, part = setup
  demos = data.demonstrations(part.train, K, seed=0)
  # Every window fits alone (none is cut), not every prompt with all K
  # demonstrations (each up to ~3000 tokens).
  context = 4096
  cfg = bgl_cfg(max_length=context)
  zero_shot = data.encode_options(tok, task, part.test, cfg)
  assert data.encode_options(tok, task, part.train, cfg).truncated == 0
  answer_len = int(zero_shot.option_mask.sum(-1).max())
  own = zero_shot.attention_mask[:, :, 0].sum(-1) - zero_shot.option_mask[
      :, :, 0].sum(-1)
  assert int(own.max()) + answer_len + 1 <= context
  arrays = data.encode_options(tok, task, part.test, cfg, demos=demos,
                               context_length=context)
  used = arrays.demos_used[arrays.valid]
  assert arrays.truncated == 0
  assert ((used > 0) & (used < K)).any()   # some dropped, some kept
  assert arrays.attention_mask.sum(-1).max() <= context
  assert arrays.tokens.shape[-1] <= context
  question = cfg.questions['loghub']
  for c in range(part.num_clients):
    for row, i in enumerate(part.test[c]):
      prompt = _prompt(tok, arrays, c, row)
      e = task.examples[i]
      assert question in prompt and e.lines[-1] in prompt
      used = int(arrays.demos_used[c, row])
      # Dropped from the end: the first `used` demonstrations, then the
      # example's whole prompt.
      assert prompt == ''.join(_render(task, j, cfg)
                               for j in demos[c][:used]) + (
                                   data.build_prompt(e, cfg.template, cfg))
  with pytest.raises(ConfigError, match='max_length=4096'):
    data.encode_options(tok, task, part.test, cfg, demos=demos,
                        context_length=1024)


def test_every_example_is_cut_as_it_is_alone(setup):
  """With max_length cutting windows, the question is exactly the zero-shot
  prompt and each demonstration is its example's prompt cut alone (the text
  training sees), followed by its answer."""
  task, tok, part = setup
  cfg = bgl_cfg(max_length=1024)
  demos = data.demonstrations(part.train, K, seed=0)
  zero_shot = data.encode_options(tok, task, part.test, cfg)
  train = data.encode_options(tok, task, part.train, cfg)
  assert zero_shot.truncated > 0 and train.truncated > 0
  arrays = data.encode_options(tok, task, part.test, cfg, demos=demos,
                               context_length=(K + 1) * 1024)
  assert arrays.truncated == zero_shot.truncated
  assert (arrays.demos_used[arrays.valid] == K).all()
  # Past max_length, rows are padded to the longest, rounded up to 64.
  longest = int(arrays.attention_mask.sum(-1).max())
  assert longest > 1024 and arrays.tokens.shape[-1] == -(-longest // 64) * 64
  cut_demos = 0
  for c in range(part.num_clients):
    where = {int(j): r for r, j in enumerate(part.train[c])}
    shown = []
    for j in demos[c]:
      alone = _prompt(tok, train, c, where[int(j)])
      cut_demos += alone != data.build_prompt(task.examples[j], cfg.template,
                                              cfg)
      shown.append(alone + data.plain_answer_prefix(cfg) +
                   task.examples[j].answer + '\n\n')
    for row in range(len(part.test[c])):
      assert _prompt(tok, arrays, c, row) == ''.join(shown) + _prompt(
          tok, zero_shot, c, row)
  assert cut_demos > 0


def test_truncation_only_with_no_demos_left(setup):
  task, tok, part = setup
  demos = data.demonstrations(part.train, K, seed=0)
  cfg = bgl_cfg(max_length=512)
  none = data.encode_options(tok, task, part.test, cfg)
  arrays = data.encode_options(tok, task, part.test, cfg, demos=demos)
  assert none.truncated > 0 and arrays.truncated == none.truncated
  assert not arrays.demos_used.any()  # no demonstration fits in 512
  for c in range(part.num_clients):
    for row in range(len(part.test[c])):
      n = int(arrays.attention_mask[c, row, 0].sum())
      if arrays.demos_used[c, row] == 0:  # the zero-shot prompt, cut or not
        assert n == int(none.attention_mask[c, row, 0].sum())
        assert np.array_equal(arrays.tokens[c, row, :, :n],
                              none.tokens[c, row, :, :n])


def test_no_demos_is_zero_shot_unchanged(setup):
  task, tok, part = setup
  cfg = bgl_cfg(max_length=1024)  # some prompts are cut
  none = data.encode_options(tok, task, part.test, cfg)
  empty = data.encode_options(tok, task, part.test, cfg,
                              demos=[[] for _ in part.test])
  assert none.truncated > 0
  for f in dataclasses.fields(none):
    x, y = getattr(none, f.name), getattr(empty, f.name)
    if isinstance(x, np.ndarray):
      assert x.dtype == y.dtype and np.array_equal(x, y), f.name
    else:
      assert x == y, f.name
  assert none.demos_used.dtype == np.int32
  assert none.demos_used.shape == none.labels.shape
  assert not none.demos_used.any()
  # Still the SFT sequence without its eos, for the correct option.
  sft = data.encode_clients(tok, task, part.test, cfg)
  for c in range(part.num_clients):
    for row in range(len(part.test[c])):
      label = none.labels[c, row]
      n = int(none.attention_mask[c, row, label].sum())
      assert np.array_equal(none.tokens[c, row, label, :n],
                            sft.tokens[c, row, :sft.lengths[c, row] - 1])
  # Constructed without demos_used (older callers): zeros of labels' shape.
  old_style = data.OptionArrays(none.tokens, none.option_mask,
                                none.attention_mask, none.labels, none.valid,
                                none.truncated)
  assert np.array_equal(old_style.demos_used, none.demos_used)


def test_k_shot_budget_default_and_bad_value():
  from fdlora_jax.fl.methods import k_shot   # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.data.max_length = 256
  # Room for 5 demonstrations and the question, within the model.
  assert k_shot.context_length(c, max_positions=8192) == 6 * 256
  assert k_shot.context_length(c, max_positions=1024) == 1024
  assert k_shot.context_length(c, max_positions=128) == 256
  c.k_shot.max_length = 512
  assert k_shot.context_length(c, max_positions=8192) == 512
  k_shot.validate(c)
  c.k_shot.max_length = 100
  with pytest.raises(ConfigError, match=r'k_shot\.max_length=100'):
    k_shot.validate(c)


def test_k_shot_declares_its_demonstrations_as_the_evaluation_context():
  """The driver knows no k-shot: the method's ``context`` hands it the
  demonstrations (its own training examples, seeded) and the budget."""
  import types   # pylint: disable=g-import-not-at-top
  from fdlora_jax.fl import api   # pylint: disable=g-import-not-at-top
  from fdlora_jax.fl.methods import k_shot, zero_shot   # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.seed, c.k_shot.shots, c.data.max_length = 5, 2, 256
  s = api.Setup(model=types.SimpleNamespace(
      cfg=types.SimpleNamespace(max_position_embeddings=8192)), base=None,
      config=c, num_clients=2, train_counts=np.array([4, 1]),
      label_counts=np.ones((2, 2)), few_shot={}, lora_init=None)
  train = [np.array([10, 11, 12, 13]), np.array([20])]
  got = k_shot.build(s).context(train)
  want = data.demonstrations(train, 2, 5)
  assert got.shots == 2 and got.length == 3 * 256
  assert [d.tolist() for d in got.demos] == [d.tolist() for d in want]
  assert set(got.demos[0]) <= {10, 11, 12, 13} and got.demos[1].tolist() == [20]
  assert zero_shot.build(s).context is None
