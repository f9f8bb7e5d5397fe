"""Option scoring against hand-computed log-likelihoods; metrics by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import evaluate
from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params
from tests import helpers

CFG = PRESETS['tiny']
LCFG = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj'))
N, M, O, L = 2, 5, 3, 10


def noisy(lora, seed, std=0.3):
  return helpers.noisy(lora, seed, std)


def make_arrays(seed=0, prompt_tokens=(3, 6), option_tokens=(1, 4),
                missing=(0, 4, 2)):
  """Prompts of 3-5 tokens, options of 1-3 tokens (half-open ranges), right
  padding; example ``missing`` has one option fewer (all padding)."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((N, M, O, L), np.int32)
  option_mask = np.zeros((N, M, O, L), np.float32)
  attention_mask = np.zeros((N, M, O, L), np.int32)
  for i in range(N):
    for j in range(M):
      prompt = rng.integers(1, CFG.vocab_size, rng.integers(*prompt_tokens))
      for k in range(O):
        if (i, j, k) == missing:
          continue
        option = rng.integers(1, CFG.vocab_size, rng.integers(*option_tokens))
        seq = np.concatenate([prompt, option])
        tokens[i, j, k, :len(seq)] = seq
        attention_mask[i, j, k, :len(seq)] = 1
        option_mask[i, j, k, len(prompt):len(seq)] = 1
  return {'tokens': tokens, 'option_mask': option_mask,
          'attention_mask': attention_mask,
          'labels': rng.integers(0, O, (N, M)).astype(np.int32),
          'valid': np.ones((N, M), bool)}


@pytest.fixture(scope='module')
def setup():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  one = lora_lib.init(model, jax.random.key(1))
  loras = lora_lib.stack([noisy(one, 10 + i) for i in range(N)])
  return model, base, loras, make_arrays()


def by_hand(model, base, lora, tokens, option_mask, attention_mask, mean):
  """One sequence at a time, unpadded: sum of log p(option token | prefix)."""
  variables = {'params': base} if lora is None else {'params': base,
                                                     'lora': lora}
  n = int(attention_mask.sum())
  logits = jax.jit(model.apply)(variables, jnp.asarray(tokens[None, :n]))[0]
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  positions = [t for t in range(1, n) if option_mask[t] > 0]
  total = sum(float(logp[t - 1, tokens[t]]) for t in positions)
  return total / len(positions) if mean else total


@pytest.mark.parametrize('normalize', ['sum', 'mean'])
def test_option_scores_match_hand_computed(setup, normalize):
  model, base, loras, arrays = setup
  scores = evaluate.option_scores(model, base, loras, arrays, chunk=2,
                                  normalize=normalize)
  assert scores.shape == (N, M, O) and scores.dtype == np.float32
  for i, j, k in [(0, 0, 0), (0, 3, 2), (1, 1, 1), (1, 4, 0)]:
    lora = jax.tree.map(lambda x: x[i], loras)
    want = by_hand(model, base, lora, arrays['tokens'][i, j, k],
                   arrays['option_mask'][i, j, k],
                   arrays['attention_mask'][i, j, k], normalize == 'mean')
    np.testing.assert_allclose(scores[i, j, k], want, rtol=1e-5, atol=1e-5)
  assert scores[0, 4, 2] == -np.inf            # a padded option
  assert np.isfinite(np.delete(scores.reshape(-1), 4 * O + 2)).all()


def test_option_scores_vmap_equals_per_client_loop_and_chunking(setup):
  model, base, loras, arrays = setup
  full = evaluate.option_scores(model, base, loras, arrays, chunk=M)
  chunked = evaluate.option_scores(model, base, loras, arrays, chunk=2)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)
  for i in range(N):
    one = {k: v[i:i + 1] for k, v in arrays.items()}
    lora_i = jax.tree.map(lambda x: x[i:i + 1], loras)
    np.testing.assert_allclose(
        evaluate.option_scores(model, base, lora_i, one, chunk=3)[0],
        full[i], rtol=1e-5, atol=1e-5)


def test_option_scores_bare_base_and_zero_b_lora_agree(setup):
  model, base, _, arrays = setup
  fresh = lora_lib.replicate(lora_lib.init(model, jax.random.key(5)), N)
  with_lora = evaluate.option_scores(model, base, fresh, arrays)
  bare = evaluate.option_scores(Llama(CFG), base, None, arrays)
  np.testing.assert_allclose(with_lora, bare, rtol=1e-6, atol=1e-6)
  want = by_hand(Llama(CFG), base, None, arrays['tokens'][1, 2, 0],
                 arrays['option_mask'][1, 2, 0],
                 arrays['attention_mask'][1, 2, 0], False)
  np.testing.assert_allclose(bare[1, 2, 0], want, rtol=1e-5, atol=1e-5)


def test_left_padding_scores_the_same(setup):
  model, base, loras, arrays = setup
  left = {k: v.copy() for k, v in arrays.items()}
  for name in ('tokens', 'option_mask', 'attention_mask'):
    x = left[name]
    for idx in np.ndindex(N, M, O):
      n = int(arrays['attention_mask'][idx].sum())
      x[idx] = np.roll(arrays[name][idx], L - n)
  np.testing.assert_allclose(
      evaluate.option_scores(model, base, loras, left),
      evaluate.option_scores(model, base, loras, arrays), rtol=1e-5,
      atol=1e-5)


def test_option_scores_errors(setup):
  model, base, loras, arrays = setup
  with pytest.raises(ValueError, match='normalize'):
    evaluate.option_scores(model, base, loras, arrays, normalize='max')
  with pytest.raises(ValueError, match='option_mask'):
    evaluate.option_scores(model, base, loras,
                           dict(arrays, option_mask=arrays['option_mask'][0]))
  with pytest.raises(ValueError, match='leading client axis'):
    evaluate.option_scores(model, base,
                           jax.tree.map(lambda x: x[:1], loras), arrays)


# ---- metrics -------------------------------------------------------------
def test_binary_f1_by_hand_with_padding_and_a_zero_positive_client():
  preds = np.array([[1, 1, 0, 0, 1, 1],     # 4 valid: tp=1 fp=1 fn=1 tn=1
                    [0, 0, 0, 1, 0, 0],     # no positive predicted or true
                    [1, 0, 1, 0, 0, 0]])    # 3 valid: tp=1 fp=1 fn=0
  labels = np.array([[1, 0, 1, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0],
                     [1, 0, 0, 1, 1, 1]])
  valid = np.array([[1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0]], bool)
  m = evaluate.classification_metrics(preds, labels, valid, 'f1', positive=1)
  c0, c1, c2 = m['per_client']
  assert (c0['n'], c1['n'], c2['n']) == (4, 3, 3)
  assert (c0['precision'], c0['recall'], c0['f1'], c0['accuracy']) == (
      0.5, 0.5, 0.5, 0.5)
  # Zero positives anywhere: precision, recall and F1 are 0.0, accuracy 1.
  assert (c1['precision'], c1['recall'], c1['f1'], c1['accuracy']) == (
      0.0, 0.0, 0.0, 1.0)
  assert (c2['precision'], c2['recall']) == (0.5, 1.0)
  assert c2['f1'] == pytest.approx(2 / 3)
  assert c2['accuracy'] == pytest.approx(2 / 3)
  assert m['mean']['f1'] == pytest.approx((0.5 + 0.0 + 2 / 3) / 3)
  assert m['std']['f1'] == pytest.approx(np.std([0.5, 0.0, 2 / 3]))
  assert m['mean']['accuracy'] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
  assert m['mean']['n'] == 10 and m['metric'] == 'f1'


def test_accuracy_equals_micro_f1_and_empty_clients_are_left_out():
  preds = np.array([[0, 2, 1, 3], [1, 1, 1, 1], [0, 0, 0, 0]])
  labels = np.array([[0, 2, 2, 3], [1, 0, 1, 0], [3, 3, 3, 3]])
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
  m = evaluate.classification_metrics(preds, labels, valid, 'accuracy')
  accs = [c['accuracy'] for c in m['per_client']]
  assert accs == [0.75, pytest.approx(2 / 3), 0.0]
  assert [c['micro_f1'] for c in m['per_client']] == accs
  assert 'f1' not in m['mean']
  assert m['per_client'][2]['n'] == 0
  assert m['mean']['accuracy'] == pytest.approx((0.75 + 2 / 3) / 2)
  assert m['std']['accuracy'] == pytest.approx(abs(0.75 - 2 / 3) / 2)


def test_majority_guess_answers_each_clients_training_majority():
  counts = np.array([[5, 2], [1, 4], [3, 3]])   # client 2 ties: option 0
  labels = np.array([[0, 1, 0], [1, 0, 1], [1, 1, 0]])
  valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
  m = evaluate.majority_guess(counts, labels, valid, 'f1', positive=1)
  # client 0 says 0 (no positive predicted: F1 0, accuracy 2/3); client 1
  # says 1 on [1, 0] (P 1/2, R 1, F1 2/3); client 2 says 0 (F1 0, acc 1/3).
  got = [(c['n'], c['accuracy'], c['f1']) for c in m['per_client']]
  np.testing.assert_allclose(got, [(3, 2 / 3, 0), (2, 0.5, 2 / 3),
                                   (3, 1 / 3, 0)])
  assert m['mean']['f1'] == pytest.approx(2 / 9)


def test_constant_guess_is_the_trivial_f1_baseline():
  labels = np.array([[0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
  m = evaluate.constant_guess(1, labels, valid, 'f1', positive=1)
  # Always "positive": recall 1, precision p = positive share, F1 2p/(1+p);
  # a client with no positive test example scores 0.
  shares = [1 / 4, 3 / 4]
  want = [2 * p / (1 + p) for p in shares] + [0.0]
  np.testing.assert_allclose([c['f1'] for c in m['per_client']], want)
  np.testing.assert_allclose([c['accuracy'] for c in m['per_client']],
                             shares + [0.0])
  assert m['mean']['f1'] == pytest.approx(sum(want) / 3)
  # Always "negative" finds nothing.
  none = evaluate.constant_guess(0, labels, valid, 'f1', positive=1)
  assert none['mean']['f1'] == 0.0
  assert none['per_client'][2]['accuracy'] == 1.0


def test_metric_errors():
  x = np.zeros((2, 3), int)
  with pytest.raises(ValueError, match='positive'):
    evaluate.classification_metrics(x, x, x.astype(bool), 'f1')
  with pytest.raises(ValueError, match='metric'):
    evaluate.classification_metrics(x, x, x.astype(bool), 'auc')
  with pytest.raises(ValueError, match=r'\[N, M\]'):
    evaluate.classification_metrics(x, x[:, :2], x.astype(bool))


def test_predict_and_format_table():
  scores = np.array([[[-3.0, -1.0, -np.inf], [-0.5, -2.0, -1.0]]])
  np.testing.assert_array_equal(evaluate.predict(scores), [[1, 0]])
  a = evaluate.classification_metrics(np.array([[1, 0], [1, 1]]),
                                      np.array([[1, 0], [0, 1]]),
                                      np.ones((2, 2), bool), 'f1', 1)
  table = evaluate.format_table({'personalized': a, 'fused': a},
                                ['f1', 'accuracy'])
  lines = table.splitlines()
  assert lines[0].split() == ['model', 'f1', 'accuracy', 'f1', 'c0', 'f1',
                              'c1']
  # f1: client 0 = 1.0, client 1 = 2/3 -> mean 83.33, std 16.67 (percent).
  assert lines[2].split() == ['personalized', '83.33±16.67', '75.00±25.00',
                              '100.00', '66.67']
  assert lines[3].split()[0] == 'fused' and len(lines) == 4
  with pytest.raises(ValueError, match="'recall@5'"):
    evaluate.format_table({'x': a}, ['recall@5'])


# ---- generation ------------------------------------------------------------
def test_greedy_generate_matches_a_python_loop(setup):
  model, base, loras, _ = setup
  lora = jax.tree.map(lambda x: x[0], loras)
  prompt = np.array([[0, 0, 5, 9, 13], [7, 3, 8, 2, 4]], np.int32)  # left pad
  mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int32)
  got = evaluate.greedy_generate(model, base, lora, jnp.asarray(prompt),
                                 jnp.asarray(mask), 4)
  apply = jax.jit(model.apply)
  for b in range(2):
    seq = list(prompt[b][mask[b] > 0])
    for _ in range(4):
      logits = apply({'params': base, 'lora': lora}, jnp.array([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    np.testing.assert_array_equal(got[b], seq[-4:])


def test_greedy_generate_stops_at_eos(setup):
  model, base, loras, _ = setup
  prompt, mask = jnp.array([[5, 9, 13]]), jnp.ones((1, 3), jnp.int32)
  free = evaluate.greedy_generate(model, base, None, prompt, mask, 4)
  eos = int(free[0, 1])
  stopped = evaluate.greedy_generate(model, base, None, prompt, mask, 4,
                                     eos_id=eos, pad_id=0)
  first = list(np.asarray(free[0])).index(eos)      # 0 or 1
  np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
  np.testing.assert_array_equal(stopped[0, first + 1:], 0)


@pytest.mark.parametrize('text,label', [
    ('No', 0), ('no.', 0), ('  NO, the log is normal', 0), ('Yes', 1),
    ('Nothing unusual', 1), ('', 1), ('The answer is no', 1)])
def test_parse_yes_no(text, label):
  assert evaluate.parse_yes_no(text) == label


def test_prompts_from_options_left_pads_the_prompt():
  tokens = np.zeros((1, 2, 2, 6), np.int32)
  tokens[0, 0, 0] = [1, 5, 6, 9, 0, 0]       # prompt 1 5 6, option 9
  tokens[0, 1, 0] = [1, 7, 9, 0, 0, 0]       # prompt 1 7, option 9
  option_mask = np.zeros((1, 2, 2, 6), np.float32)
  option_mask[0, 0, 0, 3] = option_mask[0, 1, 0, 2] = 1
  attention = (tokens > 0).astype(np.int32)
  prompts, masks = evaluate.prompts_from_options(
      {'tokens': tokens, 'option_mask': option_mask,
       'attention_mask': attention})
  np.testing.assert_array_equal(prompts[0], [[1, 5, 6], [0, 1, 7]])
  np.testing.assert_array_equal(masks[0], [[1, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize('text,index', [
    ('CPR:3 because', 1), ('cpr:4.', 2), ('none', -1), ('', -1)])
def test_parse_option(text, index):
  assert evaluate.parse_option(text, ('false', 'CPR:3', 'CPR:4')) == index


def single_token_arrays(seed=1):
  """Every option one token after a shared prompt of 3-7 tokens (as ' yes' /
  ' no'); example (1, 2) has only two options."""
  return make_arrays(seed, prompt_tokens=(3, 8), option_tokens=(1, 2),
                     missing=(1, 2, 2))


def test_one_pass_scores_equal_one_forward_per_option(setup):
  model, base, loras, multi = setup
  arrays = single_token_arrays()
  assert evaluate.shares_prompt_single_token(
      arrays['tokens'], arrays['option_mask'], arrays['attention_mask'])
  fast = evaluate.option_scores(model, base, loras, arrays, chunk=2)
  slow = evaluate.option_scores(model, base, loras, arrays, chunk=2,
                                one_pass=False)
  assert np.isneginf(fast[1, 2, 2]) and np.isneginf(slow[1, 2, 2])
  finite = np.isfinite(slow)
  assert finite.sum() == N * M * O - 1
  np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-5, atol=1e-5)
  # And against a sequence scored alone, unpadded.
  i, j, k = 0, 3, 1
  want = by_hand(model, base, jax.tree.map(lambda x: x[i], loras),
                 arrays['tokens'][i, j, k], arrays['option_mask'][i, j, k],
                 arrays['attention_mask'][i, j, k], False)
  np.testing.assert_allclose(fast[i, j, k], want, rtol=1e-4, atol=1e-4)
  # Multi-token options never take the one-pass path, and asking for it fails.
  assert not evaluate.shares_prompt_single_token(
      multi['tokens'], multi['option_mask'], multi['attention_mask'])
  with pytest.raises(ValueError, match='one_pass'):
    evaluate.option_scores(model, base, loras, multi, one_pass=True)


def test_one_pass_needs_the_same_prompt_for_every_option():
  arrays = single_token_arrays()
  arrays['tokens'][0, 1, 2, 0] += 1     # option 2 of (0, 1): another prompt
  assert not evaluate.shares_prompt_single_token(
      arrays['tokens'], arrays['option_mask'], arrays['attention_mask'])


def test_uneven_clients_are_packed_not_padded(setup):
  """Client 1 holds 2 examples, client 0 all 5: the real rows score as
  before, padded rows are -inf, whatever the chunk."""
  model, base, loras, arrays = setup
  full = evaluate.option_scores(model, base, loras, arrays, chunk=4)
  short = {k: v.copy() for k, v in arrays.items()}
  for k in ('tokens', 'option_mask', 'attention_mask'):
    short[k][1, 2:] = 0
  for chunk in (1, 3, 16):
    got = evaluate.option_scores(model, base, loras, short, chunk=chunk)
    assert np.isneginf(got[1, 2:]).all()
    real = np.isfinite(full)
    real[1, 2:] = False
    np.testing.assert_allclose(got[real], full[real], rtol=1e-5, atol=1e-5)


def prefixed(arrays, prefix_len=20, seed=7):
  """``arrays`` with the same ``prefix_len`` tokens put before every row, as
  a prompt template is."""
  start = np.random.default_rng(seed).integers(1, CFG.vocab_size, prefix_len)
  out = dict(arrays)
  real = arrays['attention_mask'].sum(-1, keepdims=True) > 0
  shape = arrays['tokens'].shape[:-1] + (prefix_len,)
  out['tokens'] = np.concatenate(
      [np.where(real, np.broadcast_to(start, shape), 0), arrays['tokens']],
      -1).astype(np.int32)
  out['attention_mask'] = np.concatenate(
      [np.where(real, 1, 0) * np.ones(shape, np.int32),
       arrays['attention_mask']], -1)
  out['option_mask'] = np.concatenate(
      [np.zeros(shape, np.float32), arrays['option_mask']], -1)
  return out


@pytest.mark.parametrize('single_token', [False, True])
def test_a_shared_prompt_start_runs_once_per_adapter(setup, single_token,
                                                     monkeypatch):
  """Scores with the shared start cached per adapter equal those of whole
  rows, for multi-token and one-pass scoring, adapters and the bare base."""
  model, base, loras, multi = setup
  prefills = []
  real_prefill = evaluate._prefill_clients   # pylint: disable=protected-access
  monkeypatch.setattr(evaluate, '_prefill_clients',
                      lambda *a: prefills.append(a[-1]) or real_prefill(*a))
  arrays = prefixed(single_token_arrays() if single_token else multi)
  assert evaluate.shared_prefix_length(
      arrays['tokens'], arrays['option_mask'],
      arrays['attention_mask']) == 20      # prompts differ after it
  for lora in (loras, None):
    fast = evaluate.option_scores(model, base, lora, arrays, chunk=3)
    slow = evaluate.option_scores(model, base, lora, arrays, chunk=3,
                                  share_prefix=False)
    finite = np.isfinite(slow)
    assert finite.sum() == N * M * O - 1
    np.testing.assert_array_equal(np.isfinite(fast), finite)
    np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-5,
                               atol=1e-5)
  assert len(prefills) == 2           # the cached path ran, once per call
  # A row scored alone, unpadded and uncached, agrees too.
  i, j, k = 1, 3, 0
  want = by_hand(model, base, jax.tree.map(lambda x: x[i], loras),
                 arrays['tokens'][i, j, k], arrays['option_mask'][i, j, k],
                 arrays['attention_mask'][i, j, k], False)
  got = evaluate.option_scores(model, base, loras, arrays)[i, j, k]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_shared_prefix_length_stops_at_the_first_difference():
  arrays = prefixed(make_arrays(), prefix_len=20)
  t, om, am = (arrays[k] for k in ('tokens', 'option_mask',
                                   'attention_mask'))
  assert evaluate.shared_prefix_length(t, om, am) == 20
  t = t.copy()
  t[1, 4, 0, 17] += 1                   # one row differs at token 17
  assert evaluate.shared_prefix_length(t, om, am) == 17
  assert evaluate.shared_prefix_length(t, om, am, minimum=18) == 0
  # Left padding: rows do not start alike.
  assert evaluate.shared_prefix_length(t[..., ::-1], om[..., ::-1],
                                       am[..., ::-1]) == 0


def test_each_client_caches_its_own_start(setup):
  """k-shot prompts open with each client's own demonstrations: the starts
  differ across clients, and each client's is cached and read back."""
  model, base, loras, arrays = setup
  a = prefixed(make_arrays(), prefix_len=20, seed=7)
  b = prefixed(make_arrays(), prefix_len=24, seed=8)   # client 1's start
  arrays = {k: np.concatenate([a[k][:1], b[k][1:, ..., 4:]], 0)
            if k in ('tokens', 'option_mask', 'attention_mask') else a[k]
            for k in a}
  # Client 1's rows are b's shifted left by 4: a different 20-token start.
  starts = evaluate.client_prefixes(arrays['tokens'], arrays['option_mask'],
                                    arrays['attention_mask'])
  assert starts.shape == (N, 20)
  np.testing.assert_array_equal(starts[0], a['tokens'][0, 0, 0, :20])
  np.testing.assert_array_equal(starts[1], b['tokens'][1, 0, 0, 4:24])
  assert evaluate.shared_prefix_length(
      arrays['tokens'], arrays['option_mask'], arrays['attention_mask']) == 0
  for lora in (loras, None):
    fast = evaluate.option_scores(model, base, lora, arrays, chunk=3)
    slow = evaluate.option_scores(model, base, lora, arrays, chunk=3,
                                  share_prefix=False)
    finite = np.isfinite(slow)
    np.testing.assert_array_equal(np.isfinite(fast), finite)
    np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-5,
                               atol=1e-5)
  # A client with no rows takes another's start; under 16 shared tokens,
  # nothing is cached.
  empty = {k: v.copy() for k, v in arrays.items()}
  for k in ('tokens', 'option_mask', 'attention_mask'):
    empty[k][1] = 0
  starts = evaluate.client_prefixes(empty['tokens'], empty['option_mask'],
                                    empty['attention_mask'])
  np.testing.assert_array_equal(starts[1], starts[0])
  assert evaluate.client_prefixes(
      arrays['tokens'], arrays['option_mask'], arrays['attention_mask'],
      minimum=21).shape == (N, 0)
