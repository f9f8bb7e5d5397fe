"""LoRA pytrees (fdlora_jax/lora.py): exact identities on adapters of a few
numbers each, with every expected value written out by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import Llama, init_params
from tests.helpers import CFG, LCFG, assert_same

# One layer (L = 1) of one projection: in = 2, out = 3, rank 2.
A = np.array([[[1., 2.],
               [3., 4.]]], np.float32)                    # [L, in, r]
B = np.array([[[1., 0., 1.],
               [0., 1., 1.]]], np.float32)                # [L, r, out]
W = np.ones((1, 2, 3), np.float32)                        # [L, in, out]
Q = ('layers', 'self_attn', 'q_proj')


def adapter(a=A, b=B):
  return {'layers': {'self_attn': {'q_proj': {'a': jnp.asarray(a),
                                              'b': jnp.asarray(b)}}}}


def params(w=W):
  """Base weights: q_proj (adapted), k_proj and a norm (not adapted)."""
  return {'layers': {'self_attn': {'q_proj': {'kernel': jnp.asarray(w)},
                                   'k_proj': {'kernel': 2 * jnp.asarray(w)}},
                     'input_norm': {'scale': jnp.arange(2.0)}}}


def q(tree):
  return tree['layers']['self_attn']['q_proj']


# ---------------------------------------------------------------------------
# LoraConfig
# ---------------------------------------------------------------------------
def test_config_sorts_targets_scales_and_refuses_bad_values():
  c = LoraConfig(rank=4, alpha=8.0, targets=('v_proj', 'q_proj', 'v_proj'))
  assert c.targets == ('q_proj', 'v_proj')
  assert c == LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj'))
  assert c.scale == 2.0 and LoraConfig(rank=8, alpha=4.0).scale == 0.5
  for fields, message in (({'targets': 'q_proj'}, 'sequence of names'),
                          ({'rank': 0}, 'rank must be > 0'),
                          ({'alpha': 0.0}, 'alpha must be > 0'),
                          ({'dropout': 1.0}, r'dropout must be in \[0, 1\)'),
                          ({'targets': ()}, 'at least one projection')):
    with pytest.raises(ValueError, match=message):
      LoraConfig(**fields)
  LoraConfig(targets=('q_proj',)).validate(('q_proj', 'v_proj'))
  with pytest.raises(ValueError, match=r"\['x_proj'\] are not projections"):
    LoraConfig(targets=('q_proj', 'x_proj')).validate(('q_proj', 'v_proj'))
  block = ml_collections.ConfigDict(dict(rank=2, alpha=3, dropout=0,
                                         targets=['v_proj', 'k_proj']))
  assert LoraConfig.from_config(block) == LoraConfig(
      rank=2, alpha=3.0, dropout=0.0, targets=('k_proj', 'v_proj'))


# ---------------------------------------------------------------------------
# Tree utilities
# ---------------------------------------------------------------------------
def test_adapted_paths_lists_every_a_b_node_in_sorted_order():
  node = {'a': jnp.zeros((1, 2, 5)), 'b': jnp.zeros((1, 5, 3))}
  tree = {'layers': {'self_attn': {'v_proj': node, 'q_proj': node},
                     'mlp': {'down_proj': node}}}
  assert lora_lib.adapted_paths(tree) == [
      ('layers', 'mlp', 'down_proj'), ('layers', 'self_attn', 'q_proj'),
      ('layers', 'self_attn', 'v_proj')]
  assert lora_lib.rank_of(tree) == 5


def test_num_params_and_num_bytes_count_by_hand():
  tree = {'p': {'a': jnp.zeros((2, 3, 4), jnp.float32),
                'b': jnp.zeros((2, 4, 5), jnp.bfloat16)},
          'c': jnp.zeros((7,), jnp.int8)}
  assert lora_lib.num_params(tree) == 24 + 40 + 7
  assert lora_lib.num_bytes(tree) == 24 * 4 + 40 * 2 + 7 * 1
  stacked = lora_lib.replicate(tree, 3)
  assert lora_lib.num_params(stacked) == 3 * 71
  assert lora_lib.num_bytes(stacked) == 3 * 183
  # The tiny model, q and v at rank 4: per layer q 64x4 + 4x64 and v
  # 64x4 + 4x32 (2 kv heads of 16), 2 layers, float32.
  model = Llama(CFG, LoraConfig(rank=4, targets=('q_proj', 'v_proj')))
  lora = lora_lib.init(model, jax.random.key(0))
  assert lora_lib.num_params(lora) == 2 * (512 + 384)
  assert lora_lib.num_bytes(lora) == 4 * 2 * (512 + 384)


def test_stack_unstack_and_replicate_round_trip():
  trees = [adapter(A + i, B * i) for i in range(3)]
  stacked = lora_lib.stack(trees)
  assert q(stacked)['a'].shape == (3, 1, 2, 2)
  assert q(stacked)['b'].shape == (3, 1, 2, 3)
  np.testing.assert_array_equal(q(stacked)['a'][2], A + 2)
  np.testing.assert_array_equal(q(stacked)['b'][0], 0 * B)
  back = lora_lib.unstack(stacked)
  assert len(back) == 3
  for tree, got in zip(trees, back, strict=True):
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    assert_same(got, tree)
  replicated = lora_lib.replicate(trees[1], 4)
  assert q(replicated)['b'].shape == (4, 1, 2, 3)
  assert_same(replicated, lora_lib.stack([trees[1]] * 4))
  for got in lora_lib.unstack(replicated):
    assert_same(got, trees[1])


def test_split_and_join_layers_and_the_head_start():
  four = adapter(np.arange(16.0).reshape(4, 2, 2),
                 np.arange(24.0).reshape(4, 2, 3))
  lower, upper = lora_lib.split_layers(four, 3)
  assert q(lower)['a'].shape == (3, 2, 2) and q(upper)['a'].shape == (1, 2, 2)
  np.testing.assert_array_equal(q(upper)['b'],
                                [[[18., 19., 20.], [21., 22., 23.]]])
  np.testing.assert_array_equal(q(lower)['a'][0], [[0., 1.], [2., 3.]])
  assert_same(lora_lib.join_layers(lower, upper), four)
  assert lora_lib.head_start(0, 8) == 6    # 0: the top quarter
  assert lora_lib.head_start(0, 2) == 1    # ... at least one layer
  assert lora_lib.head_start(3, 8) == 5
  assert lora_lib.head_start(8, 8) == 0    # the head takes every layer


# ---------------------------------------------------------------------------
# delta_W = a b alpha / r, and merging it into the base
# ---------------------------------------------------------------------------
def test_merge_is_w_plus_a_b_alpha_over_r_by_hand():
  scale = LoraConfig(rank=2, alpha=4.0).scale           # 2.0
  # a @ b = [[1, 2, 3], [3, 4, 7]]; times 2; plus W = 1.
  delta = lora_lib.delta_weights(adapter(), scale)
  assert list(delta) == [Q]
  np.testing.assert_array_equal(delta[Q], [[[2., 4., 6.], [6., 8., 14.]]])
  base = params()
  merged = lora_lib.merge(base, adapter(), scale)
  np.testing.assert_array_equal(q(merged)['kernel'],
                                [[[3., 5., 7.], [7., 9., 15.]]])
  # Other weights as they were; the base itself is not changed in place.
  np.testing.assert_array_equal(
      merged['layers']['self_attn']['k_proj']['kernel'], 2 * W)
  np.testing.assert_array_equal(merged['layers']['input_norm']['scale'],
                                [0., 1.])
  np.testing.assert_array_equal(q(base)['kernel'], W)
  # The kernel keeps its dtype (these sums are exact in bfloat16).
  merged16 = lora_lib.merge(params(W.astype(jnp.bfloat16)), adapter(), scale)
  assert q(merged16)['kernel'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(q(merged16)['kernel'].astype(np.float32),
                                [[[3., 5., 7.], [7., 9., 15.]]])


def test_zero_b_merges_to_the_base_exactly():
  zero = adapter(b=np.zeros_like(B))
  np.testing.assert_array_equal(lora_lib.delta_weights(zero, 2.0)[Q],
                                np.zeros((1, 2, 3)))
  base = params()
  merged = lora_lib.merge(base, zero, 2.0)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  assert_same(merged, base)


def test_zero_b_adapter_gives_the_base_output_whatever_a():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), 16))
  fresh = lora_lib.init(model, jax.random.key(3))
  # Large random a, b exactly zero.
  lora = lora_lib.map_adapters(lambda n: {
      'a': 5.0 * jax.random.normal(next(keys), n['a'].shape),
      'b': n['b']}, fresh)
  assert all(not np.any(np.asarray(lora_lib._get(lora, p)['b']))
             for p in lora_lib.adapted_paths(lora))
  tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, CFG.vocab_size)
  y_base = Llama(CFG).apply({'params': base}, tokens)
  y_zero = model.apply({'params': base, 'lora': lora}, tokens)
  np.testing.assert_array_equal(y_zero, y_base)
  # A non-zero b does change the output: the comparison above can fail.
  nonzero = lora_lib.map_adapters(
      lambda n: {'a': n['a'], 'b': jnp.full_like(n['b'], 0.01)}, lora)
  y = model.apply({'params': base, 'lora': nonzero}, tokens)
  assert float(jnp.abs(y - y_base).max()) > 1e-3


# ---------------------------------------------------------------------------
# A fresh adapter
# ---------------------------------------------------------------------------
def test_init_has_peft_shapes_random_a_and_zero_b():
  model = Llama(CFG, LoraConfig(rank=4, alpha=8.0,
                                targets=('q_proj', 'down_proj')))
  lora = lora_lib.init(model, jax.random.key(0))
  assert lora_lib.adapted_paths(lora) == [('layers', 'mlp', 'down_proj'), Q]
  assert q(lora)['a'].shape == (2, 64, 4) and q(lora)['b'].shape == (2, 4, 64)
  down = lora['layers']['mlp']['down_proj']
  assert down['a'].shape == (2, 176, 4) and down['b'].shape == (2, 4, 64)
  for node in (q(lora), down):
    assert not np.any(np.asarray(node['b']))
    assert np.all(np.asarray(node['a']) != 0)
  assert_same(lora_lib.init(model, jax.random.key(0)), lora)    # seeded
  other = lora_lib.init(model, jax.random.key(1))
  assert not np.array_equal(q(other)['a'], q(lora)['a'])
  rank2 = lora_lib.init_rank(model, 2, jax.random.key(0))
  assert lora_lib.rank_of(rank2) == 2 and lora_lib.rank_of(lora) == 4
  assert q(rank2)['a'].shape == (2, 64, 2) and q(rank2)['b'].shape == (2, 2, 64)
  assert not np.any(np.asarray(q(rank2)['b']))
