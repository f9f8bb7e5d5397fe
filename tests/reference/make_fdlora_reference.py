"""Writes ``fdlora_tiny.npz``: FDLoRA's state and metrics on the tiny config.

Produced once with the code *before* the method-interface refactor (commit
2ac6f77, `fdlora_jax.fl.fdlora.FDLoRA` + `run.run`, with `c.fusion.*` where
`reference_config` now sets `c.fdlora.fusion.*`), so that
``tests/test_methods.py`` can check the refactored engine reproduces it. Kept
for the record; it does not run against today's code.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fdlora_jax import io as io_lib  # noqa: E402
from fdlora_jax import run as run_lib  # noqa: E402
from tests.reference.reference_config import reference_config  # noqa: E402


def main():
  with tempfile.TemporaryDirectory() as tmp:
    c = reference_config(Path(tmp))
    results = run_lib.run(c, str(Path(tmp) / 'w'))
    ckpt = io_lib.StateCheckpoints(Path(tmp) / 'w' / 'checkpoints')
    step = ckpt.latest_step()
    state = ckpt.manager.restore(step)
    ckpt.close()
    metrics = [json.loads(l) for l in
               (Path(tmp) / 'w' / 'metrics.jsonl').read_text().splitlines()]
  flat = {}
  for key in ('personal', 'global'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(state[key]):
      name = key + '/' + '/'.join(str(getattr(p, 'key', p)) for p in path)
      flat[name] = np.asarray(leaf)
  losses = [m['train_loss'] for m in metrics if 'train_loss' in m]
  flat['train_loss'] = np.asarray(losses, np.float64)
  flat['fusion_weights'] = np.asarray(results['fusion_weights'])
  flat['headline'] = np.asarray(
      [results['models'][k]['mean']['f1']
       for k in ('personalized', 'global', 'fused')])
  out = Path(__file__).with_name('fdlora_tiny.npz')
  np.savez_compressed(out, **flat)
  print(f'wrote {out}: {len(flat)} arrays, '
        f'{out.stat().st_size} bytes, rounds {step}')


if __name__ == '__main__':
  main()
