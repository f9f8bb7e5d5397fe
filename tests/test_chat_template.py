"""Prompts through the tokenizer's chat template (data.chat_template)."""

import numpy as np
import pytest

from configs import tiny as tiny_base
from fdlora_jax import data as data_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.tokenizer import embedded_tokenizer

TEMPLATE = ("{% for m in messages %}[USER]{{ m['content'] }}[/USER]"
            "{% endfor %}{% if add_generation_prompt %}[BOT]{% endif %}")


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  c = tiny_base.get_config()
  c.data.synthetic_windows = 12
  task = data_lib.load_task(c.data, 0)
  tok = embedded_tokenizer(data_lib.tokenizer_texts(task, c.data), 512,
                           str(tmp_path_factory.mktemp('tok')),
                           whole=[' ' + o for o in task.options])
  return c, task, tok


def decoded_prompts(c, task, tok):
  arrays = data_lib.encode_options(tok, task, [np.arange(3)], c.data)
  first = arrays.tokens[0, :, 0]
  mask = arrays.attention_mask[0, :, 0] * (arrays.option_mask[0, :, 0] == 0)
  return [tok.decode(t[m > 0]) for t, m in zip(first, mask)]


def test_auto_uses_the_template_only_when_the_tokenizer_has_one(setup):
  c, task, tok = setup
  assert c.data.chat_template == 'auto'
  plain = decoded_prompts(c, task, tok)           # no template: plain text
  assert not any('[USER]' in p for p in plain)
  tok.chat_template = TEMPLATE
  try:
    chat = decoded_prompts(c, task, tok)
    for p, q in zip(plain, chat):
      assert q.count('[USER]') == 1 and q.endswith('[BOT]')
      body = p.replace('<s>', '')
      assert body.strip()[:40] in q                # the same prompt inside
    c.data.chat_template = 'off'
    assert decoded_prompts(c, task, tok) == plain
  finally:
    tok.chat_template = None
    c.data.chat_template = 'auto'


def test_on_without_a_template_is_a_config_error(setup):
  c, task, tok = setup
  c.data.chat_template = 'on'
  try:
    with pytest.raises(ConfigError, match='chat_template'):
      decoded_prompts(c, task, tok)
  finally:
    c.data.chat_template = 'auto'


def answer_tokens(c, task, tok):
  """Per option, the token ids scored after the prompt."""
  arrays = data_lib.encode_options(tok, task, [np.arange(1)], c.data)
  return [tuple(arrays.tokens[0, 0, j][arrays.option_mask[0, 0, j] > 0])
          for j in range(len(task.options))]


def test_auto_answer_prefix_is_a_space_in_plain_text_and_none_in_a_turn(
    setup):
  c, task, tok = setup
  assert c.data.answer_prefix == 'auto'
  ids = lambda text: tuple(tok(text, add_special_tokens=False)['input_ids'])
  assert data_lib.answer_prefix(tok, c.data) == ' '
  assert answer_tokens(c, task, tok) == [ids(' ' + o) for o in task.options]
  tok.chat_template = TEMPLATE
  try:
    # The answer opens the assistant's turn: "[BOT]yes", not "[BOT] yes".
    assert data_lib.answer_prefix(tok, c.data) == ''
    assert answer_tokens(c, task, tok) == [ids(o) for o in task.options]
    assert ids('yes') != ids(' yes')
    # k-shot demonstrations are plain text inside the user's turn.
    assert data_lib.plain_answer_prefix(c.data) == ' '
    c.data.answer_prefix = ' '       # an explicit prefix is used as it is
    assert answer_tokens(c, task, tok) == [ids(' ' + o) for o in task.options]
  finally:
    tok.chat_template = None
    c.data.answer_prefix = 'auto'
