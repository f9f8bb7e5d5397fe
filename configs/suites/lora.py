"""The LoRA-specific federated methods beside the CPU study's methods:
FFA-LoRA, FedSA-LoRA, RoLoRA, FedEx-LoRA, FLoRA, FlexLoRA and FedDPA with
FDLoRA, FedAvg and Local, on the CPU study's five seeds.

  python -m fdlora_jax.suite --suite=configs/suites/lora.py --workdir=runs/lora
  python -m fdlora_jax.report --workdir=runs/lora

Every point is the CPU study's (configs/suites/cpu.py: configs/logs.py on
the real LogHub lines of ../shared/data, 2,000 of them, 8 local steps then
2 rounds of K = 8, alpha 0.5, seeds 0-4), so the three methods they share
are the same runs: a finished CPU study's `logs/method=*/seed*` directories
can be copied into the workdir and are skipped (the suite checks that their
configs match). The seven new methods are 35 runs of a few minutes each on
the 2-core CPU; the suite runs seed by seed, so a stopped suite holds whole
seeds and the report pairs what is there.

The LoRA-specific methods run at their defaults: every client at the
model's rank (FLoRA and FlexLoRA support per-client ranks,
`--config.flora.ranks=(4,8,16)`; the comparison keeps one rank so only the
aggregation rule differs).
"""

from configs.suites.cpu import LOGS

BASELINES = ('fdlora', 'fedavg', 'local')
LORA = ('ffa_lora', 'fedsa_lora', 'rolora', 'fedex_lora', 'flora', 'flexlora',
        'feddpa')
METHODS = BASELINES + LORA


def get_suite():
  groups = [
      {'name': 'logs', 'config': 'logs', 'fixed': LOGS,
       'grid': {'method': METHODS},
       'report': {'kind': 'table', 'rows': 'method', 'order': METHODS,
                  'references': True,
                  'title': 'LoRA-specific methods on the logs, alpha 0.5',
                  'cols': ('data.dirichlet_alpha',),
                  'orderings': [
                      ('an exact aggregate above FedAvg',
                       [('fedex_lora', 'fedavg'), ('flora', 'fedavg'),
                        ('ffa_lora', 'fedavg'), ('rolora', 'fedavg')]),
                      ('FDLoRA above the LoRA-specific methods',
                       [('fdlora', m) for m in LORA])]}},
      {'name': 'cost', 'report': {
          'kind': 'table', 'rows': 'method', 'value': 'timing.total_s',
          'order': METHODS, 'best': 'min', 'from': 'logs',
          'title': 'Wall time of one run (s), 2-core CPU',
          'cols': ('data.dirichlet_alpha',)}},
  ]
  return {'name': 'lora',
          'configs': {'logs': 'configs/logs.py'},
          'fixed': {'data.dirichlet_alpha': 0.5},
          'seeds': (0, 1, 2, 3, 4), 'groups': groups}
