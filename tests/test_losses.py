"""The token loss (fdlora_jax/fl/losses.py): the mean NLL of masked target
log-probabilities, and the plain method loss through ``Forward`` on a toy
logits array, against hand computations; masks, padding and padded rows
must not count."""

import jax.numpy as jnp
import numpy as np

from fdlora_jax.fl.engine import Forward
from fdlora_jax.fl.losses import mean_nll, token_nll


def test_mean_nll_is_the_masked_mean_and_the_count():
  logp = jnp.asarray([[-1.0, -2.0, -100.0], [-0.5, -0.5, -64.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  value, count = mean_nll(logp, mask)
  assert float(value) == (1.0 + 2.0 + 0.5 + 0.5) / 4      # exact
  assert float(count) == 4.0


def test_mean_nll_of_no_target_is_zero_not_nan():
  value, count = mean_nll(jnp.full((2, 3), -3.0), jnp.zeros((2, 3)))
  assert float(value) == 0.0 and float(count) == 0.0


class ToyModel:
  """Stands in for the Llama: ``apply`` returns a fixed logits array."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def apply(self, variables, tokens, attention_mask, positions,
            logits_at=None, **kwargs):
    assert logits_at is None
    return self.logits


B, T, V = 3, 5, 4
RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(B, T, V)).astype(np.float32)
BATCH = {
    'tokens': np.asarray([[0, 1, 2, 3, 0], [3, 2, 1, 0, 3], [1, 1, 1, 1, 1]],
                         np.int32),
    # Row 0: targets at 2, 3 (not 4); row 1: targets 3, 4 but 4 is padding.
    'loss_mask': np.asarray([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1],
                             [0, 1, 1, 1, 1]], np.float32),
    'attention_mask': np.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                                  [1, 1, 1, 1, 1]], np.int32),
    'valid': np.asarray([1.0, 1.0, 0.0], np.float32),    # row 2: a padded row
}


def by_hand(logits, batch):
  """The mean over (row, t) of -log softmax(logits[row, t - 1])[tokens[row,
  t]] at the targets: in loss_mask, not padding, in a valid row."""
  terms = []
  for b in range(B):
    for t in range(1, T):
      if (batch['loss_mask'][b, t] and batch['attention_mask'][b, t]
          and batch['valid'][b]):
        z = logits[b, t - 1].astype(np.float64)
        logp = z - np.log(np.sum(np.exp(z)))
        terms.append(-logp[batch['tokens'][b, t]])
  return np.mean(terms), len(terms)


def loss(logits, batch):
  fwd = Forward(ToyModel(logits), base=None, num_targets=None, dropout=False)
  value, count = token_nll(fwd, {}, None, batch)
  return float(value), float(count)


def test_token_nll_is_the_mean_nll_of_the_answer_tokens():
  want, n = by_hand(LOGITS, BATCH)
  assert n == 3                         # (0, 2), (0, 3), (1, 3)
  value, count = loss(LOGITS, BATCH)
  assert count == n
  np.testing.assert_allclose(value, want, rtol=1e-6)


def test_token_nll_ignores_everything_outside_the_targets():
  value, _ = loss(LOGITS, BATCH)
  other = LOGITS.copy()
  other[0, 0] += 5.0     # predicts token 1 of row 0: not in loss_mask
  other[0, 3] -= 5.0     # predicts token 4 of row 0: not in loss_mask
  other[1, 3] += 5.0     # predicts token 4 of row 1: padding
  other[2] = 7.0 * RNG.normal(size=(T, V))   # row 2: not a valid row
  assert loss(other, BATCH)[0] == value      # bit for bit
  # ... while a target's own logits do count.
  other[0, 1] += 5.0     # predicts token 2 of row 0: a target
  assert loss(other, BATCH)[0] != value
