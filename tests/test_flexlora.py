"""FlexLoRA (fdlora_jax/fl/methods/flexlora.py) on the tiny model through
the real engine, clients of ranks 2, 4 and 8: each download is the best
approximation of the weighted full-size update at the client's own rank,
counted at that rank; main.py on the medical scenario (logs: test_methods;
kill and resume: test_run)."""

import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import flexlora
from fdlora_jax.fl.ranks import ClientRanks
from fdlora_jax.run import validate_config
from tests.helpers import (LCFG, config, copy, engine, run_scenario,
                           server_spy, weighted_delta)

COUNTS = (1, 2, 4)
RANKS = (2, 4, 8)


def test_each_download_is_the_best_approximation_at_its_rank(tiny):
  eng = engine(tiny, flexlora, config(flexlora__ranks=RANKS), COUNTS)
  cr = ClientRanks(np.asarray(RANKS), LCFG.rank)
  state = eng.initial_state()
  w = np.asarray(COUNTS, float)
  component = int(lora_lib.rank_bytes(state['server']['global'], 1))
  for i, (phase, _, t, _) in enumerate(eng.schedule()):
    with server_spy(eng, phase.name) as seen:
      new, m = eng.run_repeat(copy(state), i)
    _, uploads, _, _ = seen[0]
    assert m['bytes_up_per_client'] == [r * component for r in RANKS]
    assert m['bytes_down_per_client'] == [r * component for r in RANKS]
    full = weighted_delta(uploads['lora'], w, LCFG.scale)   # W, dense
    down = eng._download(phase, new['server'], t + 1)
    np.testing.assert_array_equal(down['rank'], RANKS)
    applied = lora_lib.delta_weights(
        cr.applied(down['lora'], down['rank']), LCFG.scale)
    for path, dense in full.items():
      u, s, vt = np.linalg.svd(dense, full_matrices=False)
      node = lora_lib._get(down['lora'], path)
      for c, r in enumerate(RANKS):
        best = np.einsum('lir,lr,lro->lio', u[..., :r], s[..., :r],
                         vt[..., :r, :])
        np.testing.assert_allclose(np.asarray(applied[path][c]), best,
                                   rtol=1e-3, atol=1e-4,
                                   err_msg=f'{path} client {c}')
        # The rank is kept: nothing beyond r_c.
        assert not np.any(np.asarray(node['a'][c, ..., r:]))
        assert not np.any(np.asarray(node['b'][c, ..., r:, :]))
    state = new


def test_config_is_validated():
  for field, value in (('ranks', ()), ('ranks', (4, -1)),
                       ('weighting', 'mean')):
    c = config()
    c.method = 'flexlora'
    c.flexlora[field] = value
    if value == ():
      validate_config(c)        # (): every client at lora.rank
      continue
    with pytest.raises(ConfigError, match=f'flexlora.{field}'):
      validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('flexlora', 'medical', tmp_path,
                   '--config.flexlora.ranks=(2,4)')
  assert r['method'] == 'flexlora' and r['headline'] == 'global'
