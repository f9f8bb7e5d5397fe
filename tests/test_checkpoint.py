"""Parity with transformers/peft (PyTorch) and checkpoint error handling."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

from fdlora_jax import checkpoint as ckpt
from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import Llama
from tests.helpers import make_hf_llama

TOKENS = np.array([[5, 17, 33, 2, 64, 71, 9, 0],
                   [41, 3, 88, 12, 0, 0, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


def torch_logits(model, tokens=TOKENS, mask=MASK, positions=None):
  with torch.no_grad():
    kw = {}
    if positions is not None:
      kw['position_ids'] = torch.tensor(positions, dtype=torch.long)
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask), **kw)
  return out.logits.float().numpy()


def assert_close_on_real_tokens(ours, theirs, mask=MASK, atol=1e-4):
  ours = np.asarray(ours)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=0)


@pytest.mark.parametrize('tie,rope', [
    (False, None),
    (True, {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
            'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
            'original_max_position_embeddings': 16}),
    (False, {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 2.0}),
])
def test_logits_match_transformers(tmp_path, tie, rope):
  hf = make_hf_llama(tmp_path, tie=tie, rope=rope)
  cfg, params = ckpt.load_pretrained(tmp_path)
  assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings == tie
  ours = Llama(cfg).apply({'params': params}, TOKENS, MASK)
  assert_close_on_real_tokens(ours, torch_logits(hf))


def test_left_padding_with_positions_matches(hf_llama):
  directory, hf = hf_llama
  cfg, params = ckpt.load_pretrained(directory)
  mask = MASK[:, ::-1].copy()
  tokens = TOKENS[:, ::-1].copy()
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = Llama(cfg).apply({'params': params}, tokens, mask, positions)
  assert_close_on_real_tokens(ours, torch_logits(hf, tokens, mask, positions),
                              mask)


def test_sharded_and_bf16_checkpoints(tmp_path, hf_llama):
  directory, hf = hf_llama
  hf.save_pretrained(tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  cfg, params = ckpt.load_pretrained(tmp_path)
  assert_close_on_real_tokens(Llama(cfg).apply({'params': params}, TOKENS,
                                               MASK), torch_logits(hf))
  cfg16, params16 = ckpt.load_pretrained(tmp_path, param_dtype='bfloat16')
  leaf = params16['layers']['self_attn']['q_proj']['kernel']
  assert leaf.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(leaf, np.float32),
      np.asarray(params['layers']['self_attn']['q_proj']['kernel'].astype(
          jnp.bfloat16), np.float32))


def _random_lora(model, seed):
  lora = lora_lib.init(model, jax.random.key(seed))
  # Non-zero B so that the adapter changes the output.
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape) * 0.3,
      lora)


def test_peft_roundtrip(tmp_path, hf_llama):
  directory, hf = hf_llama
  cfg, params = ckpt.load_pretrained(directory)
  lcfg = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj',
                                                'o_proj', 'down_proj'))
  model = Llama(cfg, lcfg)
  lora = _random_lora(model, 3)
  ours = model.apply({'params': params, 'lora': lora}, TOKENS, MASK)
  base = Llama(cfg).apply({'params': params}, TOKENS, MASK)
  assert np.abs(np.asarray(ours - base)).max() > 1e-2  # the adapter matters

  ckpt.save_peft_adapter(tmp_path / 'adapter', lora, lcfg)
  peft_model = peft.PeftModel.from_pretrained(
      make_hf_llama(tmp_path / 'fresh'), tmp_path / 'adapter').eval()
  assert_close_on_real_tokens(ours, torch_logits(peft_model))

  back, back_cfg = ckpt.load_peft_adapter(tmp_path / 'adapter', cfg, lcfg)
  assert back_cfg == lcfg
  jax.tree.map(np.testing.assert_array_equal, back, lora)


def test_loads_adapter_saved_by_peft(tmp_path, hf_llama):
  directory, _ = hf_llama
  hf = make_hf_llama(tmp_path / 'base')
  pcfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=['k_proj',
                                                            'gate_proj'],
                         lora_dropout=0.0)
  pm = peft.get_peft_model(hf, pcfg)
  torch.manual_seed(7)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.2)
  pm.eval().save_pretrained(tmp_path / 'adapter')
  cfg, params = ckpt.load_pretrained(directory)
  lora, lcfg = ckpt.load_peft_adapter(tmp_path / 'adapter', cfg)
  assert lcfg.rank == 2 and lcfg.scale == 3.0
  assert set(lcfg.targets) == {'k_proj', 'gate_proj'}
  ours = Llama(cfg, lcfg).apply({'params': params, 'lora': lora}, TOKENS, MASK)
  assert_close_on_real_tokens(ours, torch_logits(pm))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    ckpt.load_pretrained(tmp_path)


def test_non_llama_config(tmp_path, hf_llama):
  directory, _ = hf_llama
  shutil.copytree(directory, tmp_path / 'm')
  conf = json.loads((tmp_path / 'm' / 'config.json').read_text())
  conf['model_type'] = 'gpt2'
  (tmp_path / 'm' / 'config.json').write_text(json.dumps(conf))
  with pytest.raises(ckpt.CheckpointError, match='gpt2'):
    ckpt.load_pretrained(tmp_path / 'm')


def test_missing_shard(tmp_path, hf_llama):
  _, hf = hf_llama
  hf.save_pretrained(tmp_path, max_shard_size='20KB')
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  victim = sorted(set(index['weight_map'].values()))[1]
  (tmp_path / victim).unlink()
  with pytest.raises(FileNotFoundError, match=victim):
    ckpt.load_pretrained(tmp_path)


def _rewrite_weights(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = {k: np.array(v) for k, v in
             ckpt.read_safetensors(dst / 'model.safetensors')}
  edit(tensors)
  ckpt.write_safetensors(dst / 'model.safetensors', tensors)


def test_wrong_shape_names_tensor(tmp_path, hf_llama):
  directory, _ = hf_llama
  name = 'model.layers.1.self_attn.k_proj.weight'

  def edit(t):
    t[name] = np.zeros((32, 32), np.float32)
  _rewrite_weights(directory, tmp_path / 'm', edit)
  with pytest.raises(ckpt.CheckpointError,
                     match=r"model\.safetensors.*k_proj.*\(32, 32\).*\(16, 32\)"):
    ckpt.load_pretrained(tmp_path / 'm')


def test_unknown_and_missing_tensors(tmp_path, hf_llama):
  directory, _ = hf_llama

  def add(t):
    t['model.layers.0.self_attn.qkv_proj.weight'] = np.zeros((3, 3),
                                                             np.float32)
  _rewrite_weights(directory, tmp_path / 'a', add)
  with pytest.raises(ckpt.CheckpointError, match='qkv_proj'):
    ckpt.load_pretrained(tmp_path / 'a')

  def drop(t):
    del t['model.layers.1.mlp.up_proj.weight']
  _rewrite_weights(directory, tmp_path / 'b', drop)
  with pytest.raises(ckpt.CheckpointError, match=r'up_proj.*\[1\]'):
    ckpt.load_pretrained(tmp_path / 'b')


def test_adapter_mismatch(tmp_path, hf_llama):
  directory, _ = hf_llama
  cfg, _ = ckpt.load_pretrained(directory)
  lcfg = LoraConfig(rank=4, targets=('q_proj', 'v_proj'))
  lora = lora_lib.init(Llama(cfg, lcfg), jax.random.key(0))
  ckpt.save_peft_adapter(tmp_path, lora, lcfg)
  with pytest.raises(ckpt.CheckpointError, match='rank r=4.*lora.rank=8'):
    ckpt.load_peft_adapter(tmp_path, cfg, LoraConfig(rank=8,
                                                     targets=lcfg.targets))
  with pytest.raises(ckpt.CheckpointError, match='target_modules'):
    ckpt.load_peft_adapter(tmp_path, cfg, LoraConfig(rank=4,
                                                     targets=('q_proj',)))
  # A tensor of the wrong shape inside the adapter names the tensor.
  tensors = dict(ckpt.read_safetensors(tmp_path / ckpt.ADAPTER_WEIGHTS))
  tensors = {k: np.array(v) for k, v in tensors.items()}
  bad = 'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight'
  tensors[bad] = np.zeros((5, 4), np.float32)
  ckpt.write_safetensors(tmp_path / ckpt.ADAPTER_WEIGHTS, tensors)
  with pytest.raises(ckpt.CheckpointError, match=r'v_proj\.lora_B.*\(5, 4\)'):
    ckpt.load_peft_adapter(tmp_path, cfg, lcfg)
