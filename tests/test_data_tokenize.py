"""Tokenization (fdlora_jax/data/tokenize.py): loss masks, option scoring,
truncation and sampled steps."""

import numpy as np

from fdlora_jax import data
from fdlora_jax.data import tokenize
from tests.helpers import logs_cfg


def test_loss_mask_is_answer_plus_eos(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  part = data.partition(task, 3, cfg, 0)
  arrays = data.encode_clients(tok, task, part.train, cfg)
  assert arrays.tokens.shape[-1] in (64, 128, 256)
  assert arrays.truncated == 0
  for c in range(3):
    assert arrays.counts[c] == len(part.train[c])
    for row in (0, arrays.counts[c] - 1):
      e = task.examples[part.train[c][row]]
      masked = arrays.tokens[c, row][arrays.loss_mask[c, row] > 0]
      assert tok.decode(masked) == ' ' + e.answer + '</s>'
      n = arrays.lengths[c, row]
      assert arrays.attention_mask[c, row].sum() == n
      assert masked[-1] == tok.eos_token_id == arrays.tokens[c, row, n - 1]
      prompt = data.build_prompt(e, cfg.template, cfg)
      assert tok.decode(arrays.tokens[c, row, :n],
                        skip_special_tokens=True) == f'{prompt} {e.answer}'
    # Padded rows are all pad and masked out.
    assert np.all(arrays.tokens[c, arrays.counts[c]:] == tok.pad_token_id)
    assert arrays.loss_mask[c, arrays.counts[c]:].sum() == 0


def test_options_share_prompt_with_training(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  idx = [np.arange(5), np.arange(5, 7)]
  opts = data.encode_options(tok, task, idx, cfg)
  sft = data.encode_clients(tok, task, idx, cfg)
  assert opts.tokens.shape[:3] == (2, 5, 2)
  assert opts.valid.tolist() == [[True] * 5, [True] * 2 + [False] * 3]
  for c, row in ((0, 0), (1, 1)):
    for o, name in enumerate(task.options):
      toks = opts.tokens[c, row, o][opts.option_mask[c, row, o] > 0]
      assert tok.decode(toks) == ' ' + name
    label = opts.labels[c, row]
    n = int(opts.attention_mask[c, row, label].sum())
    # Scoring sequence for the right option == SFT sequence without the eos.
    assert np.array_equal(opts.tokens[c, row, label, :n],
                          sft.tokens[c, row, :sft.lengths[c, row] - 1])


def test_truncation_drops_lines_from_the_end(tok):
  cfg = logs_cfg(max_length=128, length_buckets=(64, 128))
  lines = tuple(f'line number {i} of the window' for i in range(40))
  example = data.Example('\n'.join(lines), ('no', 'yes'), 1, 'BGL', lines)
  task = data.Task('loghub', [example], ('no', 'yes'), 'f1', 'test', False)
  arrays = data.encode_clients(tok, task, [np.array([0])], cfg)
  assert arrays.truncated == 1 and arrays.lengths[0, 0] <= 128
  text = tok.decode(arrays.tokens[0, 0, :arrays.lengths[0, 0]],
                    skip_special_tokens=True)
  assert text.startswith('Below is a system log question')
  assert 'line number 0 of' in text and 'line number 39' not in text
  assert text.endswith('line number '
                       f'{text.count("line number") - 1} of the window\n\n'
                       '### Response: yes')


def test_a_line_too_long_for_the_budget_keeps_its_first_words(tok):
  # A one-line window (data.window_size=1) whose line alone is too long
  # keeps the line's first words; it never becomes an empty window with a
  # label.
  cfg = logs_cfg(max_length=128, length_buckets=(128,))
  line = ' '.join(f'word{i}' for i in range(60))
  long = data.Example(line, ('no', 'yes'), 1, 'BGL', (line,))
  short = data.Example('fits', ('no', 'yes'), 0, 'BGL', ('fits',))
  task = data.Task('loghub', [long, short], ('no', 'yes'), 'f1', 'test',
                   False)
  arrays = data.encode_clients(tok, task, [np.array([0, 1])], cfg)
  assert arrays.truncated == 1 and arrays.lengths[0, 0] <= 128
  text = tok.decode(arrays.tokens[0, 0, :arrays.lengths[0, 0]],
                    skip_special_tokens=True)
  kept = text.split('yes or no.\n', 1)[1].split('\n\n### Response')[0]
  assert kept.startswith('word0 word1') and 'word59' not in kept
  assert line.startswith(kept)
  # Without the fix the window kept 0 lines: an empty log.
  assert len(kept.split()) >= 2


def test_sample_steps_shapes_order_and_empty_clients(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  idx = [np.arange(7), np.arange(7, 10), np.zeros(0, np.int64)]
  arrays = data.encode_clients(tok, task, idx, cfg)
  full = data.sample_steps(arrays, 0, 6, 2, seed=3, buckets=(64, 128, 256))
  part = data.sample_steps(arrays, 4, 2, 2, seed=3, buckets=(64, 128, 256))
  length = full['tokens'].shape[-1]
  assert full['tokens'].shape == (6, 3, 2, length)
  assert full['valid'].shape == (6, 3, 2)
  assert full['valid'][:, 2].sum() == 0 and full['valid'][:, :2].min() == 1
  np.testing.assert_array_equal(
      part['tokens'], full['tokens'][4:, ..., :part['tokens'].shape[-1]])
  # Client 1 (3 examples): each epoch of 3 draws is a permutation.
  rows = tokenize.example_order(3, 1, 3, 0, 6, 2).reshape(-1)
  for e in range(4):
    assert sorted(rows[3 * e:3 * e + 3]) == [0, 1, 2]
  # Trimmed to the smallest bucket holding the longest drawn example.
  longest = int((full['attention_mask'].sum(-1)).max())
  assert length == min(b for b in (64, 128, 256) if b >= longest)
