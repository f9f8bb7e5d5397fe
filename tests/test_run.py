"""End to end on a tiny config: outputs, kill and resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import tiny as tiny_base
from fdlora_jax import io as io_lib
from fdlora_jax import outcomes
from fdlora_jax import run as run_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.engine import Engine
from fdlora_jax.fl.methods import fdlora, other_blocks

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, method='fdlora', **fl):
  c = tiny_base.get_config()
  c.model.name = ''   # the tiny random preset, not the default pretrained model
  c.method = method
  c.data.synthetic_windows = 60
  c.data.min_examples_per_client = 3
  c.data.few_shot = 2
  c.fl.num_clients = 3
  c.fl.rounds = 3
  c.fl.inner_steps = 2
  c.fl.inner_lr = 1e-2
  c.fl.local_epochs = 0.5
  c.eval.every = 1
  c.fdlora.fusion.steps = 2
  c.fdlora.fusion.population_size = 4
  c.model.tokenizer_cache = str(tmp_path / 'tok')
  for k, v in fl.items():
    c.fl[k] = v
  return c


def strip_timing(results):
  results = dict(results)
  results.pop('timing')
  return results


def metrics_lines(work):
  return [{k: v for k, v in json.loads(l).items() if k != 'wall_s'}
          for l in (work / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('method,every', [('fdlora', 0), ('fedavg', 0),
                                          ('flora', 0), ('flexlora', 0),
                                          ('fedavg', 3600)])
def test_kill_and_resume_gives_identical_results(tmp_path, monkeypatch,
                                                 method, every):
  """FLoRA's stack fills a slot per round and FlexLoRA's clients have
  ranks of their own: their state too resumes exactly. With checkpoints at
  most every hour, the last one is the local phase's end (the last repeat of
  a phase is always saved): the resumed run redoes round 1 as well."""
  c = tiny_config(tmp_path, method)
  if method in ('flora', 'flexlora'):
    c[method].ranks = (2, 4)
  straight = run_lib.run(c, str(tmp_path / 'a'), checkpoint_every_s=every)

  real = Engine.run_repeat
  calls = {'n': 0}

  def crash_in_round_2(self, state, index, progress=None):
    calls['n'] += 1
    if calls['n'] == 3:
      raise KeyboardInterrupt('simulated kill during round 2')
    return real(self, state, index, progress)

  monkeypatch.setattr(Engine, 'run_repeat', crash_in_round_2)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(c, str(tmp_path / 'b'), checkpoint_every_s=every)
  assert io_lib.StateCheckpoints(tmp_path / 'b' / 'checkpoints'
                                 ).latest_step() == (1 if every else 2)
  assert not (tmp_path / 'b' / 'results.json').exists()
  monkeypatch.setattr(Engine, 'run_repeat', real)
  resumed = run_lib.run(c, str(tmp_path / 'b'), checkpoint_every_s=every)

  assert strip_timing(resumed) == strip_timing(straight)
  lines = metrics_lines(tmp_path / 'a')
  assert lines == metrics_lines(tmp_path / 'b')
  assert [l['round'] for l in lines] == [0, 1, 2, 3, 3]
  assert [l.get('step') for l in lines] == [1, 2, 3, 4, None]


def test_kill_between_metrics_line_and_checkpoint(tmp_path, monkeypatch):
  """The round's metrics line is written, its checkpoint is not: the resumed
  run redoes that round and its metrics.jsonl equals an uninterrupted one."""
  c = tiny_config(tmp_path)
  run_lib.run(c, str(tmp_path / 'a'))
  real = io_lib.StateCheckpoints.save

  def die_saving_step_3(self, step, state, force=True):
    if step == 3:
      raise KeyboardInterrupt('killed before the checkpoint landed')
    return real(self, step, state, force)
  monkeypatch.setattr(io_lib.StateCheckpoints, 'save', die_saving_step_3)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(c, str(tmp_path / 'b'))
  assert [l['step'] for l in metrics_lines(tmp_path / 'b')] == [1, 2, 3]
  monkeypatch.setattr(io_lib.StateCheckpoints, 'save', real)
  run_lib.run(c, str(tmp_path / 'b'))
  assert metrics_lines(tmp_path / 'a') == metrics_lines(tmp_path / 'b')


def test_outputs_name_their_source_and_are_consistent(tmp_path):
  c = tiny_config(tmp_path)
  # (1, 0) and (0, 1) fusion weights must reproduce the two adapters exactly.
  c.fdlora.fusion.baselines = ('personal', 'global', 'average')
  r = run_lib.run(c, str(tmp_path / 'w'))
  saved = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert saved['is_synthetic'] is True and saved['method'] == 'fdlora'
  assert 'synthetic' in saved['data_source']
  assert saved['seed'] == 0 and 'tiny' in saved['model']
  assert saved['config']['fl']['rounds'] == 3
  assert saved['headline'] == 'fused'
  assert saved['models']['fusion_personal'] == saved['models']['personalized']
  assert saved['models']['fusion_global'] == saved['models']['global']
  # Per-client counts are the clients' test splits.
  partition = json.loads((tmp_path / 'w' / 'partition.json').read_text())
  tests = [cl['num_test'] for cl in partition['clients']]
  assert [pc['n'] for pc in saved['models']['fused']['per_client']] == tests
  # The no-model reference: each client's training majority, on its test.
  majority = saved['reference']['majority']['per_client']
  for cl, pc in zip(partition['clients'], majority):
    train = cl['class_counts']['train']
    said = max(train, key=lambda k: (train[k], k == 'no'))
    test = cl['class_counts']['test']
    assert pc['n'] == cl['num_test']
    assert pc['accuracy'] == pytest.approx(test[said] / max(cl['num_test'], 1))
  # ... and "always anomalous", the trivial F1 baseline: 2p / (1 + p).
  always = saved['reference']['always_positive']['per_client']
  for cl, pc in zip(partition['clients'], always):
    test = cl['class_counts']['test']
    share = test.get('yes', 0) / max(cl['num_test'], 1)
    assert pc['f1'] == pytest.approx(2 * share / (1 + share) if share else 0)
  # F1 from precision and recall, per client.
  for pc in saved['models']['personalized']['per_client']:
    p, rec = pc['precision'], pc['recall']
    assert pc['f1'] == pytest.approx(2 * p * rec / (p + rec) if p + rec
                                     else 0.0)
  # Every row's per-example answers, from which its figures follow exactly.
  assert saved['headline_metric']['name'] == 'pooled_f1'
  rows = ([(k, f'{k}.npz', v) for k, v in saved['models'].items()] +
          [(k, f'reference_{k}.npz', v) for k, v in saved['reference'].items()])
  assert {'by_system', 'nearest_message'} <= set(saved['reference'])
  for name, file, row in rows:
    o = outcomes.load(tmp_path / 'w' / 'predictions' / file)
    assert o.example.tolist() == [j for cl in partition['clients']
                                  for j in cl['test']], name
    tp = np.sum((o.pred == 1) & (o.label == 1))
    f1 = 2 * tp / max(np.sum(o.pred == 1) + np.sum(o.label == 1), 1)
    fig = row['figures']['pooled_f1']
    assert fig['value'] == pytest.approx(f1), name
    assert fig['low'] <= fig['value'] <= fig['high'], name
    assert (o.scores is not None) == (name in saved['models']), name
  assert set(saved['models']['fused']['versus_references']) == set(
      saved['reference'])
  comm = saved['communication']
  size = comm['per_round'][1]['bytes_up_per_client'][0]
  assert size > 0
  # mean_personal init: one upload after the local phase, then one up + one
  # down per round, per client.
  assert comm['bytes_up_per_client'] == [4 * size] * 3
  assert comm['bytes_down_per_client'] == [3 * size] * 3
  assert comm['bytes_total'] == 3 * 7 * size
  lines = metrics_lines(tmp_path / 'w')
  assert all(l['bytes_up_per_client'] == [size] * 3 for l in lines[1:4])
  assert 'f1' in lines[1]['eval_global']
  events = list((tmp_path / 'w').glob('events.out.tfevents.*'))
  steps = [s for s, _ in io_lib.read_events(events[0])]
  assert steps[:4] == [1, 2, 3, 4]
  assert r['search']['fusion']['fusion_weights'] and len(
      r['search']['fusion']['fusion_weights']) == 3


@pytest.mark.parametrize('field,value', [
    ('method', 'fedsgd'),
    ('fl.num_clients', 0),
    ('fl.inner_steps', 0),
    ('fl.inner_schedule', 'cosnie'),
    ('fl.local_steps', -1),
    ('fl.grad_accum', 0),
    ('fl.grad_accum', 3),   # does not divide fl.batch_size
    ('fl.inner_optimizer', 'adam'),
    ('data.dirichlet_alpha', 0.0),
    ('lora.rank', 0),
    ('lora.targets', ('q_proj', 'attn')),
    ('eval.normalize', 'avg'),
    ('fdlora.sync_every', 0.0),
    ('fdlora.global_init', 'zeros'),
    ('model.checkpoint', '/nonexistent/llama'),
])
def test_bad_config_rejected_before_compute(tmp_path, monkeypatch, field,
                                            value):
  c = tiny_config(tmp_path)
  section, name = field.split('.') if '.' in field else (None, field)
  if section:
    c[section][name] = value
  else:
    c[name] = value

  def no_data(*a, **k):
    raise AssertionError('data was loaded before the config was checked')
  monkeypatch.setattr(run_lib.data_lib, 'load_task', no_data)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    run_lib.run(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_resume_refuses_a_different_experiment(tmp_path):
  c = tiny_config(tmp_path)
  run_lib.run(c, str(tmp_path / 'w'))
  c.seed = 7
  with pytest.raises(ConfigError, match=r'seed: 0 -> 7'):
    run_lib.run(c, str(tmp_path / 'w'))
  # More rounds is a legitimate continuation.
  c.seed = 0
  c.fl.rounds = 4
  r = run_lib.run(c, str(tmp_path / 'w'))
  size = r['communication']['per_round'][1]['bytes_down_per_client'][0]
  assert r['communication']['bytes_down_per_client'] == [4 * size] * 3


def test_generate_mode_runs_and_reads_answers(tmp_path):
  c = tiny_config(tmp_path)
  c.fl.rounds = 1
  c.eval.mode = 'generate'
  r = run_lib.run(c, str(tmp_path / 'g'))
  for name in ('personalized', 'global', 'fused'):
    m = r['models'][name]['mean']
    assert 0.0 <= m['f1'] <= 1.0 and 0.0 <= m['accuracy'] <= 1.0
  assert r['config']['eval']['mode'] == 'generate'


# ---------------------------------------------------------------------------
# main.py: one clear line and exit status 2 for bad input, no partial results
# ---------------------------------------------------------------------------
def main_py(tmp_path, *flags):
  work = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/tiny.py',
       f'--workdir={work}', f'--config.model.tokenizer_cache={tmp_path}/tok',
       '--config.model.name=',
       *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
  return proc, work


def _bin_only(tmp_path):
  d = tmp_path / 'ckpt'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps(dict(
      model_type='llama', vocab_size=96, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4)))
  (d / 'pytorch_model.bin').write_bytes(b'\x80\x02' + bytes(64))
  return d


def _file(tmp_path, name, data):
  d = tmp_path / 'logs'
  d.mkdir(exist_ok=True)
  (d / name).write_bytes(data)
  return d


@pytest.mark.parametrize('case', ['bad_value', 'missing_dir', 'empty_log',
                                  'binary_log', 'bin_checkpoint'])
def test_main_reports_bad_input_in_one_line(tmp_path, case):
  flags = {
      'bad_value': lambda: ['--config.fl.inner_schedule=cosnie'],
      'missing_dir': lambda: [f'--config.data.dir={tmp_path}/nothing'],
      'empty_log': lambda: [
          f'--config.data.dir={_file(tmp_path, "BGL_empty.log", b"")}'],
      'binary_log': lambda: [
          f'--config.data.dir='
          f'{_file(tmp_path, "BGL_bin.log", bytes(range(256)) * 64)}'],
      'bin_checkpoint': lambda: [
          f'--config.model.checkpoint={_bin_only(tmp_path)}'],
  }[case]()
  proc, work = main_py(tmp_path, *flags)
  assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
  err = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(err) == 1, proc.stderr[-3000:]
  assert proc.stderr.rstrip().endswith(err[0])
  assert 'Traceback' not in proc.stderr
  named = {'bad_value': 'fl.inner_schedule', 'missing_dir': 'nothing',
           'empty_log': 'BGL_empty.log', 'binary_log': 'BGL_bin.log',
           'bin_checkpoint': 'ckpt'}[case]
  assert named in err[0]
  assert not work.exists()


def check_resumable(saved, c):
  """The check run() makes, with FDLoRA's declared Method.resumable."""
  io_lib.check_resumable(
      saved, c, allowed=run_lib.RESUMABLE_CHANGES + fdlora.RESUMABLE,
      ignored=other_blocks(c))


def test_resume_may_change_only_fields_that_do_not_shape_the_state(tmp_path):
  c = tiny_config(tmp_path)
  saved = tmp_path / 'config.json'
  saved.write_text(c.to_json_best_effort())
  c.fl.rounds = 9
  c.eval.every = 3
  c.fdlora.fusion.steps = 9        # FDLoRA's own Method.resumable fields
  check_resumable(saved, c)
  # Another method's block is never read by this run: changed, or added by
  # a later version of the code, it does not matter.
  c.fedkd.mentee_rank = 7
  saved_dict = json.loads(saved.read_text())
  del saved_dict['k_shot']
  saved.write_text(json.dumps(saved_dict))
  check_resumable(saved, c)
  c.fdlora.outer_lr = 0.5
  with pytest.raises(ConfigError, match=r'fdlora\.outer_lr'):
    check_resumable(saved, c)


def test_the_driver_names_no_method_and_no_method_field():
  """run.py reads what a Method declares, never a method's own name or
  config block (k-shot's context, FDLoRA's resumable fields)."""
  from fdlora_jax.fl.methods import METHODS   # pylint: disable=g-import-not-at-top
  source = (REPO / 'fdlora_jax' / 'run.py').read_text()
  for name in METHODS:
    assert f"'{name}" not in source and f'c.{name}' not in source, name
