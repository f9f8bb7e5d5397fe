"""Client-level differential privacy on the logs: F1 against epsilon for
FDLoRA and FedAvg (docs/privacy.md).

  python -m fdlora_jax.suite --suite=configs/suites/dp.py --workdir=runs/dp
  python -m fdlora_jax.report --workdir=runs/dp

Every point is the CPU study's (configs/suites/cpu.py: configs/logs.py on
the real LogHub lines of ../shared/data, 2,000 of them, 8 local steps then
2 rounds of K = 8, alpha 0.5) with `dp.enabled` and a target epsilon at
delta 1e-5: the noise multiplier is the smallest that spends it over the
run's private rounds (3: stage 1's upload and 2 rounds). The no-DP column
is the CPU study's own runs: copy its `logs/method=fdlora` and
`logs/method=fedavg` directories into the workdir and they are skipped.

Cut to fit a session on the 2-core CPU: 2 seeds (about 56 minutes of runs)
and no fusion baselines on FDLoRA's private runs (display-only rows).
"""

from configs.suites.cpu import LOGS

METHODS = ('fdlora', 'fedavg')
EPSILONS = (1.0, 4.0, 8.0)
PRIVATE = dict(LOGS, **{'dp.enabled': True, 'fdlora.fusion.baselines': ()})


def get_suite():
  groups = [
      {'name': 'logs', 'config': 'logs', 'fixed': LOGS,
       'grid': {'method': METHODS}},
      {'name': 'dp', 'config': 'logs', 'fixed': PRIVATE,
       'grid': {'method': METHODS, 'dp.epsilon': EPSILONS},
       'report': {'kind': 'table', 'rows': 'method', 'order': METHODS,
                  'from': ('dp', 'logs'), 'references': True,
                  'title': 'Client-level DP on the logs: headline against '
                           'epsilon (delta 1e-5), alpha 0.5',
                  'cols': ('dp.epsilon',),
                  'col_names': {'epsilon=None': 'no DP',
                                'epsilon=0.0': 'no DP'}}},
  ]
  return {'name': 'dp',
          'configs': {'logs': 'configs/logs.py'},
          'fixed': {'data.dirichlet_alpha': 0.5},
          'seeds': (0, 1), 'groups': groups}
