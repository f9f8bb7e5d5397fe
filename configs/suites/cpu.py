"""The paper's study reduced for a 2-core CPU and the default model
(SmolLM2-135M-Instruct), on the real samples in ../shared/data.

  python -m fdlora_jax.suite --suite=configs/suites/cpu.py --workdir=runs/cpu
  python -m fdlora_jax.report --workdir=runs/cpu

Each run is the CPU workload of `configs/logs.py` / `configs/medical.py`
(what they reduce from the paper, and why, is written there), cut further
toward 2 hours for the 42 runs on the 2-core machine, with Table 6's fusion
baselines scored on the logs. Its 5-shot runs put 5 demonstrations, each
cut to 256 tokens as in training, before every prompt (k_shot.max_length
defaults to room for all of them). Reduced from `paper.py`:
* one Dirichlet alpha (0.5, the paper's default) instead of {0.1, 0.5, 1.0},
  and PubMedQA only for the medical scenario, with three methods;
* RQ2-RQ4 (curves over N, K, H) and RQ6 (batch) are left to `paper.py`:
  each needs its own FDLoRA runs per setting;
* RQ5 and RQ7 read the RQ1 runs (plus zero- and 5-shot runs), and Figure 5
  is one curve per method (FDLoRA, FedAvg) at N = 5, from the same runs;
* per run, against the 10-minute defaults: 8 local steps instead of 64
  (logs) / 4 instead of 8 (medical), 2 rounds instead of 8 (logs) / 2,
  200 log examples instead of 300 (38 test examples), PubMedQA prompts cut
  at 256 tokens instead of 384 (most of the abstract is lost; question and
  options kept).
It has not been run on today's one-line logs default. Its last run, on the
logs default of that time (3-line windows of all three systems, the answer
after a space), is archived with its report in
benchmarks/results/archive/cpu_suite_3line/ (see the archive's README).
"""


# One home for the data paths, the methods and the paper's figures.
from configs.suites.paper import LOGS, MEDICAL, METHODS, PAPER_TABLE3_LOGS

WORKLOAD = {'data.dirichlet_alpha': 0.5, 'fl.rounds': 2}
LOG_DATA = {'data.dir': LOGS, 'fl.local_steps': 8, 'fl.stage1_chunk': 8,
            'data.max_examples': 200,
            # Table 6 (RQ7) scores these; configs/logs.py leaves them out.
            'fdlora.fusion.baselines': ('average', 'sum', 'random')}
MED_DATA = {'data.dir': MEDICAL, 'data.task': 'pubmedqa',
            'fl.local_steps': 4, 'fl.stage1_chunk': 4,
            'data.max_length': 256, 'data.length_buckets': (128, 256)}


def get_suite():
  curve_methods = ('fdlora', 'fedavg')
  groups = [
      # FDLoRA and FedAvg also score their global adapter after every round
      # (the same evaluation, no effect on training): Figure 5's curve at
      # N = 5.
      {'name': 'rq1_logs_global', 'config': 'logs',
       'fixed': {**LOG_DATA, 'eval.every': 1},
       'grid': {'method': curve_methods},
       'report': {'kind': 'curve', 'series': 'method', 'row': 'global',
                  'title': 'Figure 5 (RQ2) at N = 5: global adapter per '
                           'round, logs (alpha 0.5)',
                  'file': 'fig5_global_per_round.png'}},
      {'name': 'rq1_logs', 'config': 'logs', 'fixed': LOG_DATA,
       'grid': {'method': tuple(m for m in METHODS
                                if m not in curve_methods)},
       'report': {'kind': 'table', 'rows': 'method', 'order': METHODS,
                  'references': True,
                  'from': ('rq1_logs_global', 'rq1_logs'),
                  'title': 'Table 3 (RQ1): logs, F1 (alpha 0.5)',
                  'cols': ('data.dirichlet_alpha',),
                  'paper': PAPER_TABLE3_LOGS}},
      {'name': 'rq5_icl', 'config': 'logs', 'fixed': LOG_DATA,
       'grid': {'method': ('zero_shot', 'k_shot')}},
      {'name': 'rq1_medical', 'config': 'medical', 'fixed': MED_DATA,
       'grid': {'method': ('fdlora', 'local', 'fedavg')},
       'report': {'kind': 'table', 'rows': 'method', 'order': METHODS,
                  'references': True,
                  'title': 'Table 3 (RQ1): PubMedQA, accuracy (alpha 0.5)',
                  'cols': ('data.task',)}},
      {'name': 'rq5', 'report': {
          'kind': 'table', 'from': ('rq5_icl', 'rq1_logs_global'),
          'title': 'Table 4 (RQ5): in-context learning vs the adapters',
          'references': True,
          'rows': [('0-shot', 'zero_shot', 'zero_shot'),
                   ('5-shot', 'k_shot', 'k_shot'),
                   ('personalized only', 'fdlora', 'personalized'),
                   ('global only', 'fdlora', 'global'),
                   ('FDLoRA', 'fdlora', 'fused')],
          'cols': ('data.task',)}},
      {'name': 'rq7', 'report': {
          'kind': 'table', 'from': 'rq1_logs_global',
          'where': {'method': 'fdlora'},
          'title': 'Table 6 (RQ7): fusion strategies', 'references': True,
          'rows': [('Random', 'fdlora', 'fusion_random'),
                   ('Average', 'fdlora', 'fusion_average'),
                   ('Sum', 'fdlora', 'fusion_sum'),
                   ('AdaFusion', 'fdlora', 'fused')],
          'cols': ('data.dirichlet_alpha',)}},
      {'name': 'cost', 'report': {
          'kind': 'table', 'rows': 'method', 'value': 'timing.total_s',
          'order': METHODS + ('zero_shot', 'k_shot'),
          'best': 'min',
          'from': ('rq1_logs_global', 'rq1_logs', 'rq5_icl', 'rq1_medical'),
          'title': 'Wall time of one run (s), 2-core CPU (FDLoRA and FedAvg '
                   'on logs include a global-adapter evaluation per round)',
          'cols': ('data.task',)}},
  ]
  return {'name': 'cpu',
          'configs': {'logs': 'configs/logs.py',
                      'medical': 'configs/medical.py'},
          'fixed': WORKLOAD, 'seeds': (0, 1, 2), 'groups': groups}
