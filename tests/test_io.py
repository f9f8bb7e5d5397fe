"""Event files, metrics log and orbax run-state round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import io as io_lib


def test_crc32c_known_vectors():
  # RFC 3720 test vectors for CRC-32C.
  assert io_lib.crc32c(b'') == 0
  assert io_lib.crc32c(b'123456789') == 0xE3069283
  assert io_lib.crc32c(bytes(32)) == 0x8A9136AA


def test_event_file_round_trip(tmp_path):
  w = io_lib.EventWriter(tmp_path)
  w.scalars(1, {'train/loss': 2.5, 'eval/f1': 0.75})
  w.scalars(2, {'train/loss': 1.25, 'skip_nan': float('nan')})
  w.close()
  events = io_lib.read_events(w.path)
  assert events == [(1, {'train/loss': 2.5, 'eval/f1': 0.75}),
                    (2, {'train/loss': 1.25})]
  # A flipped byte is caught by the CRC.
  raw = bytearray(w.path.read_bytes())
  raw[-6] ^= 0xFF
  w.path.write_bytes(bytes(raw))
  try:
    io_lib.read_events(w.path)
    raise AssertionError('corruption not detected')
  except ValueError as e:
    assert 'CRC' in str(e)


def test_metrics_log_truncates_on_resume(tmp_path):
  log = io_lib.MetricsLog(tmp_path / 'm.jsonl', None)
  for s in range(1, 5):
    log.write({'step': s, 'round': s - 1, 'x': np.float32(s)})
  log.write({'final': True, 'f1': 0.5})  # no step: a final line
  io_lib.MetricsLog(tmp_path / 'm.jsonl', 2)
  lines = [json.loads(l) for l in (tmp_path / 'm.jsonl').read_text().split(
      '\n') if l]
  assert [l['step'] for l in lines] == [1, 2]
  assert lines[1]['x'] == 2.0
  io_lib.MetricsLog(tmp_path / 'm.jsonl', None)  # a fresh run empties it
  assert (tmp_path / 'm.jsonl').read_text() == ''


def test_state_checkpoint_round_trip(tmp_path):
  opt = optax.sgd(0.1, momentum=0.5, nesterov=True)
  g = {'layers': {'q': {'a': jnp.arange(6.0).reshape(2, 3)}}}
  state = {'round': jnp.array(3, jnp.int32), 'global': g,
           'outer': opt.init(g),
           'personal': jax.tree.map(lambda x: jnp.stack([x, -x]), g)}
  ck = io_lib.StateCheckpoints(tmp_path / 'ck')
  ck.save(3, state)
  ck.save(4, jax.tree.map(lambda x: x + 1, state))
  assert ck.latest_step() == 4
  like = jax.tree.map(jnp.zeros_like, state)
  back = ck.restore(like, 3)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  assert jax.tree.structure(back) == jax.tree.structure(state)


def test_state_checkpoints_keep_their_interval_unless_forced(tmp_path):
  state = {'w': jnp.arange(3.0)}
  ck = io_lib.StateCheckpoints(tmp_path / 'ck', max_to_keep=5,
                               min_interval_s=3600)
  assert ck.save(1, state, force=False)          # the first one always
  assert not ck.save(2, state, force=False)      # within the hour
  assert ck.save(3, state, force=True)           # a phase's last repeat
  assert sorted(ck.manager.all_steps()) == [1, 3]
  every = io_lib.StateCheckpoints(tmp_path / 'every')   # the default: all
  assert every.save(1, state, force=False) and every.save(2, state,
                                                          force=False)


TWO_PROCESS_SAVES = """
import sys, time
import numpy as np
from fdlora_jax import io as io_lib, sharding
port, i, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sharding.initialize_distributed(f'127.0.0.1:{port}', 2, i, timeout_s=120)
assert sharding.same_on_every_process(i == 0) is True
assert sharding.same_on_every_process(i == 1) is False
ck = io_lib.StateCheckpoints(directory, max_to_keep=5, min_interval_s=3600)
state = {'w': np.arange(3.0, dtype=np.float32)}
saved = [ck.save(1, state, force=False)]
# Process 1's clock says its last save is long past, process 0's that it
# has just saved: process 0 decides, both skip.
if i == 1:
  ck._last_save -= 7200
saved.append(ck.save(2, state, force=False))
# Now the other way round: both save (one saving alone would hang).
ck._last_save = time.monotonic() - (7200 if i == 0 else 0)
saved.append(ck.save(3, state, force=False))
print('SAVED', saved, sorted(ck.manager.all_steps()), flush=True)
ck.close()
"""


def test_state_checkpoints_decide_alike_in_every_process(tmp_path):
  """Under jax.distributed a save is a collective: whether an interval has
  passed is process 0's call, or a process saving alone waits forever."""
  import os
  import sys
  from tests.helpers import REPO, free_port, run_processes
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  env.pop('XLA_FLAGS', None)
  outs = run_processes(
      [[sys.executable, '-c', TWO_PROCESS_SAVES, str(port), str(i),
        str(tmp_path / 'ck')] for i in range(2)], env, tmp_path / 'logs',
      timeout_s=300)
  for code, out, err in outs:
    assert code == 0, err[-3000:]
    assert 'SAVED [True, False, True] [1, 3]' in out, out


def test_a_field_added_since_is_no_change_at_its_default():
  import ml_collections
  from fdlora_jax.io import config_changes
  now = ml_collections.ConfigDict({'a': 1, 'dp': {'enabled': False}})
  defaults = ml_collections.ConfigDict({'a': 5, 'dp': {'enabled': False}})
  saved = {'a': 1}                           # written before config.dp was
  assert config_changes(saved, now) == 'dp.enabled: None -> False'
  assert config_changes(saved, now, defaults=defaults) == ''
  now.dp.enabled = True                      # not the default: a change
  assert config_changes(saved, now, defaults=defaults) == (
      'dp.enabled: None -> True')
  # A field the saved config has is compared as before.
  assert config_changes({'a': 2, 'dp': {'enabled': True}}, now,
                        defaults=defaults) == 'a: 2 -> 1'
