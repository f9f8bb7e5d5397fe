"""The paper's study reduced for a 2-core CPU and the default model
(SmolLM2-135M-Instruct), on the real samples in ../shared/data.

  python -m fdlora_jax.suite --suite=configs/suites/cpu.py --workdir=runs/cpu
  python -m fdlora_jax.report --workdir=runs/cpu

Reduced from `paper.py` (what and why):
* one Dirichlet alpha (0.5, the paper's default) instead of {0.1, 0.5, 1.0},
  and PubMedQA only for the medical scenario;
* 80 examples per task (`data.max_examples`), 10-line log windows (the
  Spirit sample's own window size) cut at 256 tokens, N = 5 clients, T = 5
  rounds of K = 3 steps, half an epoch of local learning, AdaFusion with 3
  steps of population 4;
* RQ2-RQ4 (curves over N, K, H) and RQ6 (batch) are left to `paper.py`:
  each needs its own FDLoRA runs per setting;
* RQ5 and RQ7 read the RQ1 runs (plus zero- and 5-shot runs).
The grid has 42 runs with 3 seeds. Its total time on the 2-core machine has
not been measured yet; the target is at most 2 hours (about 3 minutes a
run), and the per-run workload above is the knob to turn if it is longer.
"""

LOGS = '../shared/data/loghub'
MEDICAL = '../shared/data/medical'
WORKLOAD = {'model.name': 'smollm2-135m-instruct', 'fl.num_clients': 5,
            'fl.rounds': 5, 'fl.inner_steps': 3, 'fl.local_epochs': 0.5,
            'data.max_examples': 80, 'data.max_length': 256,
            'data.length_buckets': (128, 256), 'eval.every': 0,
            'fdlora.fusion.steps': 3, 'fdlora.fusion.population_size': 4,
            'data.dirichlet_alpha': 0.5,
            # As configs/logs.py, for the medical runs too (2e-4 barely moves
            # the adapters in this few steps).
            'fl.inner_lr': 1e-3,
            # Table 6 (RQ7) scores these; configs/logs.py leaves them out.
            'fdlora.fusion.baselines': ('average', 'sum', 'random')}
LOG_DATA = {'data.dir': LOGS, 'data.window_size': 10,
            'data.window_stride': 10}
MED_DATA = {'data.dir': MEDICAL, 'data.task': 'pubmedqa'}
METHODS = ('fdlora', 'local', 'fedavg', 'fedkd', 'fedamp', 'fedrep', 'fedrod',
           'pfedlora', 'fedlora_opt')


def get_suite():
  groups = [
      {'name': 'rq1_logs', 'config': 'logs', 'fixed': LOG_DATA,
       'grid': {'method': METHODS},
       'report': {'kind': 'table', 'rows': 'method',
                  'title': 'Table 3 (RQ1): logs, F1 (alpha 0.5)',
                  'cols': ('data.dirichlet_alpha',)}},
      {'name': 'rq1_medical', 'config': 'medical', 'fixed': MED_DATA,
       'grid': {'method': ('fdlora', 'local', 'fedavg')},
       'report': {'kind': 'table', 'rows': 'method',
                  'title': 'Table 3 (RQ1): PubMedQA, accuracy (alpha 0.5)',
                  'cols': ('data.task',)}},
      {'name': 'rq5_icl', 'config': 'logs', 'fixed': LOG_DATA,
       'grid': {'method': ('zero_shot', 'k_shot')}},
      {'name': 'rq5', 'report': {
          'kind': 'table', 'from': ('rq5_icl', 'rq1_logs'),
          'title': 'Table 4 (RQ5): in-context learning vs the adapters',
          'rows': [('0-shot', 'zero_shot', 'zero_shot'),
                   ('5-shot', 'k_shot', 'k_shot'),
                   ('personalized only', 'fdlora', 'personalized'),
                   ('global only', 'fdlora', 'global'),
                   ('FDLoRA', 'fdlora', 'fused')],
          'cols': ('data.task',)}},
      {'name': 'rq7', 'report': {
          'kind': 'table', 'from': 'rq1_logs',
          'title': 'Table 6 (RQ7): fusion strategies',
          'rows': [('Random', 'fdlora', 'fusion_random'),
                   ('Average', 'fdlora', 'fusion_average'),
                   ('Sum', 'fdlora', 'fusion_sum'),
                   ('AdaFusion', 'fdlora', 'fused')],
          'cols': ('data.dirichlet_alpha',)}},
  ]
  return {'name': 'cpu',
          'configs': {'logs': 'configs/logs.py',
                      'medical': 'configs/medical.py'},
          'fixed': WORKLOAD, 'seeds': (0, 1, 2), 'groups': groups}
