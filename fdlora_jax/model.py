"""A LLaMA-family decoder in Flax, with LoRA as its own variable collection.

The module follows Hugging Face's ``LlamaForCausalLM``: RMSNorm, rotary
embeddings in the rotate-half layout, grouped-query attention, a SwiGLU MLP,
tied or untied embeddings. Decoder layers are stacked with ``nn.scan``, so every
per-layer array has a leading ``[num_layers, ...]`` axis and a 32-layer model
compiles as fast as a 1-layer one.

Two variable collections::

  params  the frozen base weights (never differentiated)
  lora    the adapters: for every targeted projection ``a`` of shape
          ``[L, in, r]`` and ``b`` of shape ``[L, r, out]``

so a forward with an adapter is ``model.apply({'params': base, 'lora': lora},
tokens)`` and without one ``model.apply({'params': base}, tokens)``.

Example::

  cfg = PRESETS['tiny']
  model = Llama(cfg, LoraConfig(rank=4, targets=('q_proj', 'v_proj')))
  variables = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  logits = model.apply(variables, tokens)          # [B, T, vocab]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax.lora import LoraConfig

Array = jax.Array

# Projection names as Hugging Face spells them, with the sub-module that holds
# them. These are also the only legal LoRA targets.
ATTENTION_PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
MLP_PROJECTIONS = ('gate_proj', 'up_proj', 'down_proj')
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Attention implementations (LlamaConfig.attention, config.model.attention).
ATTENTION = ('auto', 'xla', 'cudnn')
# rope_type values of LlamaConfig.rope_scaling (Hugging Face's names).
ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters (field names follow HF's ``LlamaConfig``)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: Optional[int] = None     # default hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # None, or a dict as in HF's ``rope_parameters`` / ``rope_scaling`` with
  # ``rope_type`` in {'default', 'linear', 'llama3'} (as a tuple of items so
  # the config stays hashable).
  rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  # Execution (not part of the checkpoint):
  dtype: str = 'float32'         # compute dtype
  param_dtype: str = 'float32'   # storage dtype of the base weights
  remat: bool = False            # rematerialise each decoder layer
  attention: str = 'auto'        # 'auto' | 'xla' | 'cudnn'

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size',
                 'num_hidden_layers', 'num_attention_heads',
                 'num_key_value_heads'):
      if getattr(self, name) < 1:
        raise ValueError(f'LlamaConfig.{name} must be >= 1, got '
                         f'{getattr(self, name)}')
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f'LlamaConfig.num_attention_heads ({self.num_attention_heads}) must '
          f'be a multiple of num_key_value_heads ({self.num_key_value_heads})')
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError('LlamaConfig.hidden_size must be divisible by '
                       'num_attention_heads when head_dim is not given')
    if self.attention not in ATTENTION:
      raise ValueError(f"LlamaConfig.attention must be 'auto', 'xla' or "
                       f"'cudnn', got {self.attention!r}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # validates names

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def projection_shape(self, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection, e.g. ``'q_proj'``."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.dim_per_head
    shapes = {
        'q_proj': (d, self.num_attention_heads * hd),
        'k_proj': (d, self.num_key_value_heads * hd),
        'v_proj': (d, self.num_key_value_heads * hd),
        'o_proj': (self.num_attention_heads * hd, d),
        'gate_proj': (d, f), 'up_proj': (d, f), 'down_proj': (f, d),
    }
    if name not in shapes:
      raise ValueError(f'Unknown projection {name!r}; LLaMA has {PROJECTIONS}')
    return shapes[name]

  def replace(self, **kw) -> 'LlamaConfig':
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, LlamaConfig] = {
    # The embedded default: same code path as 7B, small enough for a 2-core CPU.
    'tiny': LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                        num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024),
    # A wider CPU benchmark model (4 layers, 256 wide).
    'small': LlamaConfig(vocab_size=2048, hidden_size=256,
                         intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2048),
    # LLaMA-2-7B shapes (meta-llama/Llama-2-7b-hf config.json).
    'llama2_7b': LlamaConfig(vocab_size=32000, hidden_size=4096,
                             intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32,
                             rms_norm_eps=1e-5, rope_theta=10000.0,
                             max_position_embeddings=4096),
    # SmolLM2-135M(-Instruct) shapes (HuggingFaceTB config.json): the default
    # model's shape with random weights, for benchmarks that need no weights.
    'smollm2_135m': LlamaConfig(vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3,
                                rms_norm_eps=1e-5, rope_theta=100000.0,
                                tie_word_embeddings=True,
                                max_position_embeddings=8192),
    # 32 layers at reduced width: the 7B depth for compile-time measurements.
    'llama2_7b_narrow': LlamaConfig(vocab_size=32000, hidden_size=256,
                                    intermediate_size=688,
                                    num_hidden_layers=32,
                                    num_attention_heads=8,
                                    num_key_value_heads=8,
                                    max_position_embeddings=4096),
}


# ---------------------------------------------------------------------------
# Rotary embeddings (HF rotate-half layout)
# ---------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> Array:
  """Inverse frequencies ``[head_dim // 2]``, with HF's rope scaling rules."""
  hd = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, jnp.float32) / hd))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return inv_freq
  if kind == 'linear':
    return inv_freq / scaling['factor']
  if kind == 'llama3':
    factor = scaling['factor']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_position_embeddings']
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f'Unsupported rope_type {kind!r} (supported: '
                   f'{", ".join(ROPE_TYPES)})')


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates ``x [B, T, H, hd]`` by ``positions [B, T]`` (rotate-half)."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True)
                                 + self.eps)
    # HF: weight * hidden.to(input_dtype)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


# Random (non-checkpoint) weights: fan-in scaled, std 1/sqrt(in). HF's fixed
# std 0.02 suits 4096-wide models; at 64 wide it caps every logit near +-1.3
# (|h| ~ sqrt(64) times |w| ~ 0.02 sqrt(64)), so no adapter could make the
# tiny model confident.
_kernel_init = nn.initializers.lecun_normal()


def _lora_a_init(key, shape, dtype=jnp.float32):
  # PEFT: kaiming_uniform_(A, a=sqrt(5)) on A of shape (r, in), i.e. a bound
  # of 1/sqrt(in). Stored here transposed as [in, r].
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraLinear(nn.Module):
  """``y = x W (+ b) + dropout(x) A B * alpha / r``.

  ``kernel`` is ``[in, out]`` (Flax layout; HF's weight transposed). When the
  projection is a LoRA target, the ``lora`` collection holds ``a [in, r]``
  (PEFT's ``lora_A.weight`` transposed) and ``b [r, out]`` (``lora_B.weight``
  transposed). Without a ``lora`` collection the layer is the plain base.
  """
  features: int
  use_bias: bool
  lora: Optional[LoraConfig]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kernel = self.param('kernel', _kernel_init,
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype),
                   kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora is not None and (self.is_initializing()
                                  or self.has_variable('lora', 'a')):
      r = self.lora.rank
      a = self.variable('lora', 'a', lambda: _lora_a_init(
          self.make_rng('params'), (x.shape[-1], r))).value
      b = self.variable('lora', 'b', lambda: jnp.zeros(
          (r, self.features), jnp.float32)).value
      h = x
      if self.lora.dropout > 0 and not deterministic:
        h = nn.Dropout(self.lora.dropout)(h, deterministic=False)
      h = jnp.einsum('...i,ir->...r', h.astype(self.dtype),
                     a.astype(self.dtype))
      # Scale the rank-r activations, not the [..., out] product: the same
      # value, but the backward then never rescales (and, under vmap, never
      # copies into a transposed layout) a full-width activation.
      h = h * jnp.asarray(self.lora.scale, self.dtype)
      y = y + jnp.einsum('...r,ro->...o', h, b.astype(self.dtype))
    return y


def projection(cfg: LlamaConfig, lora: Optional[LoraConfig], name: str,
               features: int, use_bias: bool) -> LoraLinear:
  """The projection ``name``, with an adapter if ``lora`` targets it."""
  targeted = lora if (lora and name in lora.targets) else None
  return LoraLinear(features, use_bias, targeted, jnp.dtype(cfg.dtype),
                    jnp.dtype(cfg.param_dtype), name=name)


def _attention_bias(key_mask: Array, query_slots: Array) -> Array:
  """Additive bias ``[B, 1, T, S]``: 0 where a query may attend, else -big.

  ``key_mask [B, S]`` marks real keys; ``query_slots [T]`` are the key slots
  the queries occupy (``arange(T)`` without a cache), so a query sees the
  real keys at or before its own slot.
  """
  causal = jnp.arange(key_mask.shape[-1])[None, :] <= query_slots[:, None]
  allowed = causal[None, None] & key_mask[:, None, None, :].astype(bool)
  return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


class Attention(nn.Module):
  """Self-attention. With ``decode=True`` it keeps a KV cache in the
  ``cache`` collection (``k``, ``v`` ``[B, S, kv_heads, head_dim]``, the key
  mask ``[B, S]`` and the next free slot): the first call (``init``) sizes the
  cache from its input, later calls write their keys at the free slot and
  attend to everything cached so far."""
  cfg: LlamaConfig
  lora: Optional[LoraConfig]
  decode: bool = False
  read_prefix: bool = False

  @nn.compact
  def __call__(self, x, positions, attention_mask, deterministic):
    cfg = self.cfg
    b, t, _ = x.shape
    hd, nh, nkv = cfg.dim_per_head, cfg.num_attention_heads, \
        cfg.num_key_value_heads
    dtype = jnp.dtype(cfg.dtype)
    proj = lambda name, features: projection(cfg, self.lora, name, features,
                                             cfg.attention_bias)

    q = proj('q_proj', nh * hd)(x, deterministic).reshape(b, t, nh, hd)
    k = proj('k_proj', nkv * hd)(x, deterministic).reshape(b, t, nkv, hd)
    v = proj('v_proj', nkv * hd)(x, deterministic).reshape(b, t, nkv, hd)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)

    if self.read_prefix:
      return proj('o_proj', cfg.hidden_size)(
          self._after_prefix(q, k, v, attention_mask), deterministic)
    if self.decode:
      return proj('o_proj', cfg.hidden_size)(
          self._cached(q, k, v, attention_mask), deterministic)

    impl = cfg.attention
    if impl == 'auto':
      impl = 'cudnn' if (jax.default_backend() == 'gpu'
                         and dtype in (jnp.bfloat16, jnp.float16)) else 'xla'
    if impl == 'cudnn':
      # Fused flash attention; GQA handled natively (nh % nkv == 0). Keys are
      # masked by length, so batches must be RIGHT-padded (as every training,
      # scoring and fusion batch here is; left-padded decoding uses the
      # cache path).
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation='cudnn',
          key_value_seq_lengths=attention_mask.sum(-1).astype(jnp.int32))
    else:
      # XLA's reference attention; GQA natively. On CPU its [B, H, T, S]
      # layout is ~2.5x faster forward than a grouped 'btkgh,bskh->bkgts'
      # einsum, which transposed the score matrices. Scores, bias and softmax
      # in float32, as before.
      bias = _attention_bias(attention_mask, jnp.arange(t))  # [B, 1, T, S]
      out = jax.nn.dot_product_attention(q, k, v, bias=bias,
                                         implementation='xla')
    out = out.reshape(b, t, nh * hd)
    return proj('o_proj', cfg.hidden_size)(out, deterministic)

  def _cached(self, q, k, v, attention_mask):
    b, t, nh, hd = q.shape
    ready = self.has_variable('cache', 'k')
    ck = self.variable('cache', 'k', jnp.zeros, k.shape, k.dtype)
    cv = self.variable('cache', 'v', jnp.zeros, v.shape, v.dtype)
    cm = self.variable('cache', 'mask', jnp.zeros, attention_mask.shape,
                       jnp.int32)
    ci = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    slots = jnp.arange(t)
    if ready:  # not the sizing call of init
      i = ci.value
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
      cm.value = jax.lax.dynamic_update_slice(
          cm.value, attention_mask.astype(jnp.int32), (0, i))
      ci.value = i + t
      k, v, attention_mask, slots = ck.value, cv.value, cm.value, i + slots
    out = jax.nn.dot_product_attention(
        q, k, v, bias=_attention_bias(attention_mask, slots),
        implementation='xla')
    return out.reshape(b, t, nh * hd)


  def _after_prefix(self, q, k, v, attention_mask):
    """The queries follow a prefix whose keys and values the ``cache``
    collection holds for one row (:func:`prefill`); every row attends to
    them, read only. The broadcast is one layer's, inside the scan."""
    b, t, nh, hd = q.shape
    pk, pv, pm = (self.get_variable('cache', name)
                  for name in ('k', 'v', 'mask'))       # [1, P, ...], [1, P]
    p = pk.shape[1]
    widen = lambda c, x: jnp.concatenate(
        [jnp.broadcast_to(c, (b,) + c.shape[1:]).astype(x.dtype), x], 1)
    k, v = widen(pk, k), widen(pv, v)
    mask = widen(pm, attention_mask.astype(pm.dtype))
    out = jax.nn.dot_product_attention(
        q, k, v, bias=_attention_bias(mask, p + jnp.arange(t)),
        implementation='xla')
    return out.reshape(b, t, nh * hd)


class Mlp(nn.Module):
  cfg: LlamaConfig
  lora: Optional[LoraConfig]

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    proj = lambda name, features: projection(cfg, self.lora, name, features,
                                             cfg.mlp_bias)

    gate = proj('gate_proj', cfg.intermediate_size)(x, deterministic)
    up = proj('up_proj', cfg.intermediate_size)(x, deterministic)
    return proj('down_proj', cfg.hidden_size)(nn.silu(gate) * up,
                                              deterministic)


class DecoderLayer(nn.Module):
  cfg: LlamaConfig
  lora: Optional[LoraConfig]
  deterministic: bool = True
  decode: bool = False
  read_prefix: bool = False

  @nn.compact
  def __call__(self, x, positions, attention_mask):
    cfg, deterministic = self.cfg, self.deterministic
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='input_layernorm')(x)
    x = x + Attention(cfg, self.lora, self.decode, self.read_prefix,
                      name='self_attn')(
        h, positions, attention_mask, deterministic)
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype,
                name='post_attention_layernorm')(x)
    x = x + Mlp(cfg, self.lora, name='mlp')(h, deterministic)
    return x, None  # (carry, per-layer output) for nn.scan


class Llama(nn.Module):
  """``LlamaForCausalLM``: tokens ``[B, T]`` -> logits ``[B, T, vocab]``.

  Args (call):
    tokens: int ``[B, T]``.
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding. Default all 1.
      Right padding everywhere; left padding only with the XLA attention
      (``cfg.attention='xla'`` or the CPU default) or ``decode=True``.
    positions: ``[B, T]`` rotary positions. Default ``arange(T)`` (as HF's
      forward without ``position_ids``).
    deterministic: False enables LoRA dropout (needs a ``'dropout'`` rng).
    return_hidden: return the final normed hidden states instead of logits.
    logits_at: int ``[B, A]``: compute logits only at these positions and
      return ``[B, A, vocab]`` (the LM head is then A/T of its full cost).
  """
  cfg: LlamaConfig
  lora: Optional[LoraConfig] = None
  # KV-cache decoding (see Attention); apply with mutable=['cache'].
  decode: bool = False
  # The tokens follow a prefix cached by `prefill` (`apply_after_prefix`).
  read_prefix: bool = False

  @nn.compact
  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True,
               return_hidden: bool = False,
               logits_at: Optional[Array] = None) -> Array:
    cfg = self.cfg
    if self.lora is not None:
      self.lora.validate(PROJECTIONS)
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                     param_dtype=pdtype,
                     embedding_init=nn.initializers.normal(0.02),
                     name='embed_tokens')
    x = embed(tokens)

    layer = DecoderLayer
    if cfg.remat:
      layer = nn.remat(layer, prevent_cse=False,
                       policy=jax.checkpoint_policies.nothing_saveable)
    stack = nn.scan(layer,
                    variable_axes={'params': 0, 'lora': 0, 'cache': 0},
                    split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=cfg.num_hidden_layers)
    x, _ = stack(cfg, self.lora, deterministic, self.decode,
                 self.read_prefix, name='layers')(x, positions,
                                                  attention_mask)
    x = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='norm')(x)
    if return_hidden:
      return x
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      kernel = self.param('lm_head', _kernel_init,
                          (cfg.hidden_size, cfg.vocab_size), pdtype)
      logits = jnp.einsum('btd,dv->btv', x, kernel.astype(dtype))
    return logits.astype(jnp.float32)


def positions_from_mask(attention_mask: Array) -> Array:
  """Rotary positions counting real tokens only (left or right padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(
      jnp.int32)


def num_targets_bucket(target_mask) -> int:
  """Static ``num_targets`` for :func:`target_log_probs` (host side).

  The smallest power of two that holds the most target tokens of any row
  (``target_mask[..., 1:]``), capped at ``T - 1``. Few distinct values, so
  few compilations.
  """
  target_mask = np.asarray(target_mask)
  most = int((target_mask[..., 1:] > 0).sum(-1).max(initial=0))
  return min(1 << max(most - 1, 0).bit_length(), target_mask.shape[-1] - 1)


def empty_cache(model: 'Llama', batch: int, length: int) -> dict:
  """A zero KV cache (``cache`` collection) for ``batch`` rows of ``length``
  tokens; every layer's ``k``, ``v`` ``[layers, batch, length, kv_heads,
  head_dim]``, key ``mask`` ``[layers, batch, length]`` and next free slot
  ``index`` ``[layers]``."""
  decoder = model.clone(decode=True)
  sizing = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: decoder.init(jax.random.key(0), sizing))['cache']
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def prefill(model: 'Llama', variables: dict, prefix: Array) -> dict:
  """The KV cache of one token sequence ``prefix [P]`` (one row, positions
  ``0..P-1``) for :func:`apply_after_prefix`: every layer's ``k``, ``v``
  ``[layers, 1, P, kv_heads, head_dim]`` and key ``mask``.

  The keys and values of a shared prompt start depend on the adapter (LoRA
  on q/v changes the hidden states), so a cache belongs to one
  ``variables``."""
  p = prefix.shape[0]
  _, updated = model.clone(decode=True).apply(
      {**variables, 'cache': empty_cache(model, 1, p)}, prefix[None],
      jnp.ones((1, p), jnp.int32), jnp.arange(p, dtype=jnp.int32)[None],
      logits_at=jnp.full((1, 1), p - 1, jnp.int32), mutable=['cache'])
  return updated['cache']


def prefix_length(cache: dict) -> int:
  """``P`` of a :func:`prefill` cache (static): its key masks' last axis."""
  return {x.shape[-1] for path, x in jax.tree_util.tree_leaves_with_path(cache)
          if getattr(path[-1], 'key', None) == 'mask'}.pop()


def apply_after_prefix(model: 'Llama', variables: dict, cache: dict,
                       tokens: Array, attention_mask: Array, positions: Array,
                       logits_at: Optional[Array] = None, **kwargs) -> Array:
  """``model.apply`` of ``tokens [B, T]`` whose first ``P`` tokens are the
  sequence ``cache`` holds (:func:`prefill`, shared by every row): only
  ``tokens[:, P:]`` run, attending to the cached keys (read only).

  Returns the logits of the suffix, ``[B, T - P, vocab]``, or with
  ``logits_at [B, A]`` (positions counted from ``P``) ``[B, A, vocab]``.
  Equals ``model.apply(variables, tokens, ...)`` at those positions up to
  float rounding."""
  p = prefix_length(cache)
  return model.clone(read_prefix=True).apply(
      {**variables, 'cache': cache}, tokens[:, p:], attention_mask[:, p:],
      positions[:, p:], logits_at=logits_at, **kwargs)


def shared_prefix_length(tokens, target_mask, attention_mask,
                         minimum: int = 16) -> int:
  """How many leading tokens every row with a target (any leading axes:
  clients, examples, options) shares, unpadded, ending before the position
  whose logits predict the first target token; 0 when fewer than
  ``minimum``.

  Log and QA prompts open with the same template and instruction (about 119
  of a log window's 256 tokens with SmolLM2's chat template); with
  :func:`prefill` that start runs once per adapter instead of once per
  row."""
  tokens, target_mask, attention_mask = (
      np.asarray(x) for x in (tokens, target_mask, attention_mask))
  real = target_mask.sum(-1) > 0
  if not real.any():
    return 0
  tok, tm, am = tokens[real], target_mask[real], attention_mask[real]
  first = int(np.argmax(tm > 0, -1).min())
  same = (tok == tok[:1]).all(0) & (am == 1).all(0)               # [L]
  p = int(np.argmin(same)) if not same.all() else same.size
  p = min(p, first - 1)
  return p if p >= minimum else 0


def shared_prefix(tokens, target_mask, attention_mask,
                  minimum: int = 16) -> np.ndarray:
  """The tokens :func:`shared_prefix_length` counts, ``[P]`` (``[0]`` when
  none): what :func:`prefill` caches."""
  p = shared_prefix_length(tokens, target_mask, attention_mask, minimum)
  tokens = np.asarray(tokens)
  if not p:
    return np.zeros(0, tokens.dtype)
  return tokens[np.asarray(target_mask).sum(-1) > 0][0, :p]


def prompt_end(target_mask: Array) -> Array:
  """``[...]`` the position of each row's last prompt token: the one before
  its first target token (0 for a row with none)."""
  return jnp.maximum(jnp.argmax(target_mask > 0, axis=-1) - 1, 0).astype(
      jnp.int32)


def hidden_at(model: 'Llama', variables: dict, tokens: Array,
              attention_mask: Array, at: Array) -> Array:
  """``[B, H]`` float32: the final (normed) hidden state of row ``b`` at
  position ``at[b]``: e.g. the embedding of a prompt at its last token
  (:func:`prompt_end`), as Hugging Face's ``hidden_states[-1][:, -1]`` of a
  left-padded prompt."""
  x = model.apply(variables, tokens, attention_mask,
                  positions_from_mask(attention_mask), return_hidden=True)
  return jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0].astype(
      jnp.float32)


def target_log_probs(model: 'Llama', variables: dict, tokens: Array,
                     target_mask: Array, attention_mask: Array,
                     num_targets: Optional[int] = None,
                     rngs: Optional[dict] = None,
                     cache: Optional[dict] = None) -> tuple[Array, Array]:
  """``log p(tokens[t] | tokens[:t])`` at the target positions.

  The one place where the project turns logits into token log-likelihoods:
  training loss, AdaFusion's few-shot loss and option scoring all use it.

  Args:
    model, variables: the module and ``{'params': ..., 'lora': ...}``.
    tokens, target_mask, attention_mask: ``[B, T]``; ``target_mask[b, t]``
      marks token ``t`` as a target (e.g. the answer). Padding never counts.
    num_targets: static ``A``: logits are computed only at ``A`` positions
      per row (the first ``A`` targets), so the LM head and the log-softmax
      cost ``A`` rows instead of ``T``. It must hold every target
      (:func:`num_targets_bucket`); ``None``: all ``T - 1`` positions.
    rngs: e.g. ``{'dropout': key}`` to enable LoRA dropout.
    cache: every row starts with the ``P`` tokens this :func:`prefill`
      cache holds: only the rest runs. No target may lie in the first
      ``P + 1`` tokens (:func:`shared_prefix_length`).

  Returns:
    ``(logp [B, A], mask [B, A])``, float32; ``mask`` is 0 where a slot holds
    no target.
  """
  s = prefix_length(cache) if cache is not None else 0
  t = tokens.shape[-1] - s
  # Position t of the logits predicts token t + 1 (counted from the prefix).
  mask = (target_mask[:, s + 1:] * attention_mask[:, s + 1:]).astype(
      jnp.float32)
  targets = tokens[:, s + 1:]
  at = None
  if num_targets is not None and num_targets < t - 1:
    # Stable sort: the target positions first, in order, then the others.
    at = jnp.argsort(-mask, axis=-1, stable=True)[:, :num_targets]
    mask = jnp.take_along_axis(mask, at, axis=1)
    targets = jnp.take_along_axis(targets, at, axis=1)
  kwargs = {}
  if rngs is not None:
    kwargs = dict(deterministic=False, rngs=rngs)
  positions = positions_from_mask(attention_mask)
  if s:
    logits = apply_after_prefix(model, variables, cache, tokens,
                                attention_mask, positions, logits_at=at,
                                **kwargs)
  else:
    logits = model.apply(variables, tokens, attention_mask, positions,
                         logits_at=at, **kwargs)
  if at is None:
    logits = logits[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return logp, mask


def init_params(cfg: LlamaConfig, rng: jax.Array) -> dict:
  """Random base weights (``params`` collection only), built under ``jit``."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.jit(lambda r: Llama(cfg).init(r, tokens)['params'])(rng)


def param_shapes(cfg: LlamaConfig) -> dict:
  """``jax.ShapeDtypeStruct`` tree of the base weights; allocates nothing."""
  return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0),
                                                jnp.zeros((1, 1), jnp.int32))
                        )['params']
