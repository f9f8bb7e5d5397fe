"""Model and LoRA identities on the tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params
from tests import helpers

CFG = PRESETS['tiny']
LCFG = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'up_proj',
                                              'down_proj'))
TOKENS = jax.random.randint(jax.random.key(0), (3, 9), 0, CFG.vocab_size)
MASK = jnp.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])


@pytest.fixture(scope='module')
def base():
  return init_params(CFG, jax.random.key(1))


def noisy(lora, seed, std=0.2):
  return helpers.noisy(lora, seed, std)


def test_fresh_lora_is_exactly_the_base(base):
  model = Llama(CFG, LCFG)
  lora = lora_lib.init(model, jax.random.key(2))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(
      jax.tree.map(lambda n: n, {p: lora_lib._get(lora, p)['b']
                                 for p in lora_lib.adapted_paths(lora)})))
  assert float(jnp.abs(lora['layers']['self_attn']['q_proj']['a']).max()) > 0
  y_base = Llama(CFG).apply({'params': base}, TOKENS, MASK)
  y_lora = model.apply({'params': base, 'lora': lora}, TOKENS, MASK)
  np.testing.assert_array_equal(y_base, y_lora)


def test_lora_shapes_and_counts(base):
  lora = lora_lib.init(Llama(CFG, LCFG), jax.random.key(2))
  q = lora['layers']['self_attn']['q_proj']
  assert q['a'].shape == (2, 64, 4) and q['b'].shape == (2, 4, 64)
  assert lora['layers']['self_attn']['v_proj']['b'].shape == (2, 4, 32)
  assert lora['layers']['mlp']['down_proj']['a'].shape == (2, 176, 4)
  # q: 64*4+4*64, v: 64*4+4*32, up: 64*4+4*176, down: 176*4+4*64; x2 layers
  expected = 2 * ((512) + (256 + 128) + (256 + 704) + (704 + 256))
  assert lora_lib.num_params(lora) == expected
  assert lora_lib.num_bytes(lora) == 4 * expected
  # PEFT's kaiming-uniform bound for A is 1/sqrt(in_features).
  assert float(jnp.abs(q['a']).max()) <= 1 / np.sqrt(64)


def test_merged_weights_equal_unmerged_lora(base):
  model = Llama(CFG, LCFG)
  lora = noisy(lora_lib.init(model, jax.random.key(2)), 3)
  y_lora = model.apply({'params': base, 'lora': lora}, TOKENS, MASK)
  merged = lora_lib.merge(base, lora, LCFG.scale)
  y_merged = Llama(CFG).apply({'params': merged}, TOKENS, MASK)
  y_base = Llama(CFG).apply({'params': base}, TOKENS, MASK)
  assert float(jnp.abs(y_lora - y_base).max()) > 0.1
  np.testing.assert_allclose(y_merged, y_lora, atol=2e-5)


def test_vmap_over_stacked_clients_equals_separate_calls(base):
  model = Llama(CFG, LCFG)
  fresh = lora_lib.init(model, jax.random.key(2))
  clients = [noisy(fresh, s) for s in (10, 11, 12, 13)]
  stacked = lora_lib.stack(clients)
  assert stacked['layers']['self_attn']['q_proj']['a'].shape == (4, 2, 64, 4)

  def forward(lora, tokens, mask):
    return model.apply({'params': base, 'lora': lora}, tokens, mask)

  batch = jnp.stack([TOKENS] * 4) + jnp.arange(4)[:, None, None]
  masks = jnp.stack([MASK] * 4)
  together = jax.jit(jax.vmap(forward, in_axes=(0, 0, 0)))(stacked, batch,
                                                            masks)
  for i, lora in enumerate(lora_lib.unstack(stacked)):
    np.testing.assert_allclose(together[i], forward(lora, batch[i], masks[i]),
                               atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, lora, clients[i])
  assert lora_lib.replicate(fresh, 3)['layers']['mlp']['up_proj'][
      'b'].shape == (3, 2, 4, 176)


def test_remat_gives_same_loss_and_grads(base):
  lora = noisy(lora_lib.init(Llama(CFG, LCFG), jax.random.key(2)), 4)

  def loss(lora, remat):
    model = Llama(CFG.replace(remat=remat), LCFG)
    logits = model.apply({'params': base, 'lora': lora}, TOKENS, MASK)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  l0, g0 = jax.value_and_grad(loss)(lora, False)
  l1, g1 = jax.value_and_grad(loss)(lora, True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               g0, g1)


def test_dropout_only_when_not_deterministic(base):
  lcfg = LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=('q_proj',))
  model = Llama(CFG, lcfg)
  lora = noisy(lora_lib.init(model, jax.random.key(2)), 5)
  v = {'params': base, 'lora': lora}
  y1 = model.apply(v, TOKENS, MASK)
  y2 = model.apply(v, TOKENS, MASK)
  np.testing.assert_array_equal(y1, y2)
  y3 = model.apply(v, TOKENS, MASK, deterministic=False,
                   rngs={'dropout': jax.random.key(0)})
  assert float(jnp.abs(y3 - y1).max()) > 1e-3


def test_bf16_compute_keeps_f32_logits(base):
  model = Llama(CFG.replace(dtype='bfloat16'), LCFG)
  lora = lora_lib.init(model, jax.random.key(2))
  y = model.apply({'params': base, 'lora': lora}, TOKENS, MASK)
  y32 = Llama(CFG).apply({'params': base}, TOKENS, MASK)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y32, atol=0.1)


@pytest.mark.parametrize('kwargs,field', [
    (dict(rank=0), 'lora.rank'), (dict(alpha=0.0), 'lora.alpha'),
    (dict(dropout=1.0), 'lora.dropout'), (dict(targets=()), 'lora.targets'),
    (dict(targets='q_proj'), 'lora.targets')])
def test_bad_lora_config(kwargs, field):
  with pytest.raises(ValueError, match=field):
    LoraConfig(**kwargs)


def test_unknown_target_is_rejected():
  model = Llama(CFG, LoraConfig(targets=('q_proj', 'qkv')))
  with pytest.raises(ValueError, match=r"lora.targets \['qkv'\]"):
    lora_lib.init(model, jax.random.key(0))


def test_target_log_probs_only_at_targets_equals_full(base):
  from fdlora_jax.model import num_targets_bucket, target_log_probs
  model = Llama(CFG, LCFG)
  lora = noisy(lora_lib.init(model, jax.random.key(2)), 6)
  v = {'params': base, 'lora': lora}
  target = np.zeros((3, 9), np.float32)
  target[0, 6:9] = 1          # three answer tokens at the end
  target[1, 4:6] = 1
  target[2, 1] = 1            # row 2 has two real tokens
  target[2, 5] = 1            # ...and this one is padding: never counted
  assert num_targets_bucket(target) == 4
  full_lp, full_m = target_log_probs(model, v, TOKENS, target, MASK)
  lp, m = target_log_probs(model, v, TOKENS, target, MASK, num_targets=4)
  assert lp.shape == (3, 4) and full_lp.shape == (3, 8)
  np.testing.assert_array_equal(m.sum(-1), [3, 2, 1])
  np.testing.assert_allclose((lp * m).sum(-1), (full_lp * full_m).sum(-1),
                             atol=1e-5)
  # By hand: log_softmax of the logits at t - 1, read at token t.
  logits = model.apply(v, TOKENS, MASK)
  logp = jax.nn.log_softmax(logits, -1)
  by_hand = sum(float(logp[0, t - 1, TOKENS[0, t]]) for t in (6, 7, 8))
  np.testing.assert_allclose(float((lp * m)[0].sum()), by_hand, atol=1e-5)


def test_num_targets_bucket():
  from fdlora_jax.model import num_targets_bucket
  mask = np.zeros((2, 64))
  mask[0, 10:15] = 1
  assert num_targets_bucket(mask) == 8
  mask[1, 1:] = 1
  assert num_targets_bucket(mask) == 63   # capped at T - 1
  assert num_targets_bucket(np.zeros((1, 16))) == 1


def test_kv_cache_decoding_equals_full_forward(base):
  model = Llama(CFG, LCFG)
  lora = noisy(lora_lib.init(model, jax.random.key(2)), 7)
  v = {'params': base, 'lora': lora}
  tokens = TOKENS[:2, :7]
  full = model.apply(v, tokens)
  decoder = model.clone(decode=True)
  cache = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: decoder.init(jax.random.key(0), jnp.zeros((2, 7), jnp.int32))
  )['cache'])
  assert cache['layers']['self_attn']['k'].shape == (2, 2, 7, 2, 16)
  ones = lambda t: jnp.ones((2, t), jnp.int32)
  pos = lambda a, b: jnp.broadcast_to(jnp.arange(a, b), (2, b - a))
  prefill, mut = decoder.apply({**v, 'cache': cache}, tokens[:, :4], ones(4),
                               pos(0, 4), mutable=['cache'])
  np.testing.assert_allclose(prefill, full[:, :4], atol=1e-5)
  cache = mut['cache']
  for t in range(4, 7):
    step, mut = decoder.apply({**v, 'cache': cache}, tokens[:, t:t + 1],
                              ones(1), pos(t, t + 1), mutable=['cache'])
    cache = mut['cache']
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
  assert int(cache['layers']['self_attn']['index'][0]) == 7
