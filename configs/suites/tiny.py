"""A tiny suite for the tests and a smoke run: tiny random model, built-in
synthetic logs, 2 methods x 2 alphas x 2 seeds x 2 rounds, plus one curve.

  python -m fdlora_jax.suite --suite=configs/suites/tiny.py --workdir=/tmp/tiny
  python -m fdlora_jax.report --workdir=/tmp/tiny
"""


def get_suite():
  return {
      'name': 'tiny',
      'configs': {'logs': 'configs/tiny.py'},
      'seeds': (0, 1),
      'fixed': {'model.name': '', 'data.synthetic_windows': 40,
                'data.min_examples_per_client': 3, 'data.few_shot': 2,
                'fl.num_clients': 2, 'fl.rounds': 2, 'fl.inner_steps': 1,
                'fl.local_epochs': 0.25, 'eval.every': 1,
                'fdlora.fusion.steps': 1, 'fdlora.fusion.population_size': 4},
      'groups': [
          {'name': 'rq1', 'config': 'logs',
           'grid': {'method': ('fdlora', 'fedavg'),
                    'data.dirichlet_alpha': (0.5, 1.0)},
           'report': {'kind': 'table', 'title': 'Table 3 (RQ1), tiny',
                      'rows': 'method', 'cols': ('data.dirichlet_alpha',)}},
          {'name': 'rq7',   # the fdlora points of rq1
           'report': {'kind': 'table', 'title': 'Table 6 (RQ7), tiny',
                      'from': 'rq1',
                      'rows': [('Random', 'fdlora', 'fusion_random'),
                               ('Average', 'fdlora', 'fusion_average'),
                               ('Sum', 'fdlora', 'fusion_sum'),
                               ('AdaFusion', 'fdlora', 'fused')],
                      'cols': ('data.dirichlet_alpha',)}},
          {'name': 'rq2', 'config': 'logs',
           'grid': {'fl.num_clients': (2, 3)},
           'report': {'kind': 'curve', 'title': 'Figure 5 (RQ2), tiny',
                      'series': 'fl.num_clients', 'row': 'global',
                      'file': 'fig5_clients.png'}},
      ],
  }
