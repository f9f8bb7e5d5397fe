"""Synthetic logs (fdlora_jax/data/synthetic.py)."""

from fdlora_jax import data
from fdlora_jax.data import logs
from fdlora_jax.data import synthetic
from tests.helpers import logs_cfg


def test_synthetic_is_labelled_seeded_and_30_percent():
  a = data.load_task(logs_cfg(), 0)
  b = data.load_task(logs_cfg(), 0)
  c = data.load_task(logs_cfg(), 1)
  assert a.examples == b.examples and a.examples != c.examples
  assert a.is_synthetic and a.data_source.startswith('synthetic: ')
  assert 'NOT real' in a.data_source
  assert all(e.source.startswith('synthetic:') for e in a.examples)
  assert len(a.examples) == 300
  assert sum(e.label for e in a.examples) == 90  # 30% of each system
  assert {e.source for e in a.examples} == {
      'synthetic:BGL', 'synthetic:Thunderbird', 'synthetic:Spirit'}
  # Anomalous windows hold anomaly-template lines, normal ones none.
  anomaly_words = ('TLB', 'storage interrupt', 'FAILED', 'terminated',
                   'failed to read', 'KERNEL_IB', 'bus error', 'Temperature',
                   'task_check', 'EXT3-fs error', 'LANai', 'Bad file',
                   'SRAM')
  for e in a.examples:
    assert any(w in e.text for w in anomaly_words) == bool(e.label)


def test_synthetic_file_parses_like_loghub(tmp_path):
  for system in synthetic.SYSTEMS:
    path = synthetic.write_synthetic_log(tmp_path / f'{system}_syn.log',
                                         system, 500, seed=3, block=50)
    stats = logs.ParseStats(str(path))
    wins = list(logs.log_examples(path, 50, 50, stats))
    assert stats.skipped == 0 and stats.lines == 500
    assert sum(e.label for e in wins) == 3  # round(0.3 * 10)
