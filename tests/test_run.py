"""End to end on a tiny config: outputs, kill and resume, bad configs."""

import json

import pytest

from configs import logs
from fdlora_jax import io as io_lib
from fdlora_jax import run as run_lib
from fdlora_jax.fl.fdlora import FDLoRA


def tiny_config(tmp_path, **fl):
  c = logs.get_config()
  c.data.synthetic_windows = 60
  c.data.min_examples_per_client = 3
  c.data.few_shot = 2
  c.fl.num_clients = 3
  c.fl.rounds = 3
  c.fl.inner_steps = 2
  c.fl.inner_lr = 1e-2
  c.fl.local_epochs = 0.5
  c.eval.every = 1
  c.fusion.steps = 2
  c.fusion.population_size = 4
  c.model.tokenizer_cache = str(tmp_path / 'tok')
  for k, v in fl.items():
    c.fl[k] = v
  return c


def strip_timing(results):
  results = dict(results)
  results.pop('timing')
  return results


def test_kill_and_resume_gives_identical_results(tmp_path, monkeypatch):
  c = tiny_config(tmp_path)
  straight = run_lib.run(c, str(tmp_path / 'a'))

  real_round = FDLoRA.fl_round
  calls = {'n': 0}

  def crash_in_round_3(self, state):
    calls['n'] += 1
    if calls['n'] == 3:
      raise KeyboardInterrupt('simulated kill during round 3')
    return real_round(self, state)

  monkeypatch.setattr(FDLoRA, 'fl_round', crash_in_round_3)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(c, str(tmp_path / 'b'))
  assert io_lib.StateCheckpoints(tmp_path / 'b' / 'checkpoints'
                                 ).latest_step() == 2
  assert not (tmp_path / 'b' / 'results.json').exists()
  monkeypatch.setattr(FDLoRA, 'fl_round', real_round)
  resumed = run_lib.run(c, str(tmp_path / 'b'))

  assert strip_timing(resumed) == strip_timing(straight)
  lines_a = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl')
             .read_text().splitlines()]
  lines_b = [json.loads(l) for l in (tmp_path / 'b' / 'metrics.jsonl')
             .read_text().splitlines()]
  drop = lambda ls: [{k: v for k, v in l.items() if k != 'wall_s'}
                     for l in ls]
  assert drop(lines_a) == drop(lines_b)
  assert [l['round'] for l in lines_a] == [0, 1, 2, 3, 3]


def test_outputs_name_their_source_and_count_bytes(tmp_path):
  c = tiny_config(tmp_path)
  r = run_lib.run(c, str(tmp_path / 'w'))
  saved = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert saved['is_synthetic'] is True
  assert 'synthetic' in saved['data_source']
  assert saved['seed'] == 0 and 'tiny' in saved['model']
  assert saved['config']['fl']['rounds'] == 3
  for name in ('personalized', 'global', 'fused', 'fusion_average'):
    m = saved['models'][name]
    assert len(m['per_client']) == 3
    assert 0.0 <= m['mean']['f1'] <= 1.0
  size = saved['communication']['adapter_bytes']
  # mean_personal init: one upload after stage 1, then one up + one down per
  # round, per client.
  assert saved['communication']['bytes_up_per_client'] == 4 * size
  assert saved['communication']['bytes_total'] == 3 * 7 * size
  lines = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl')
           .read_text().splitlines()]
  assert all(l['bytes_up_per_client'] == [size] * 3 for l in lines[1:4])
  assert 'f1' in lines[1]['eval_global']
  events = list((tmp_path / 'w').glob('events.out.tfevents.*'))
  steps = [s for s, _ in io_lib.read_events(events[0])]
  assert steps[:4] == [0, 1, 2, 3]
  partition = json.loads((tmp_path / 'w' / 'partition.json').read_text())
  assert partition['num_clients'] == 3
  assert r['fusion_weights'] and len(r['fusion_weights']) == 3


@pytest.mark.parametrize('field,value,message', [
    ('fl.num_clients', 0, 'fl.num_clients'),
    ('fl.inner_steps', 0, 'fl.inner_steps'),
    ('fl.sync_every', 0.0, 'fl.sync_every'),
    ('data.dirichlet_alpha', 0.0, 'data.dirichlet_alpha'),
    ('lora.rank', 0, 'lora.rank'),
    ('lora.targets', ('q_proj', 'attn'), 'lora.targets'),
])
def test_bad_config_rejected_before_compute(tmp_path, monkeypatch, field,
                                            value, message):
  c = tiny_config(tmp_path)
  section, name = field.split('.')
  c[section][name] = value

  def no_data(*a, **k):
    raise AssertionError('data was loaded before the config was checked')
  monkeypatch.setattr(run_lib.data_lib, 'load_task', no_data)
  with pytest.raises(ValueError, match=message):
    run_lib.run(c, str(tmp_path / 'w'))


def test_resume_refuses_a_different_experiment(tmp_path):
  c = tiny_config(tmp_path)
  run_lib.run(c, str(tmp_path / 'w'))
  c.seed = 7
  with pytest.raises(ValueError, match=r'seed: 0 -> 7'):
    run_lib.run(c, str(tmp_path / 'w'))
  # More rounds is a legitimate continuation.
  c.seed = 0
  c.fl.rounds = 4
  r = run_lib.run(c, str(tmp_path / 'w'))
  assert r['communication']['bytes_down_per_client'] == 4 * r[
      'communication']['adapter_bytes']


def test_generate_mode_runs_and_reads_answers(tmp_path):
  c = tiny_config(tmp_path)
  c.fl.rounds = 1
  c.eval.mode = 'generate'
  r = run_lib.run(c, str(tmp_path / 'g'))
  for name in ('personalized', 'global', 'fused'):
    m = r['models'][name]['mean']
    assert 0.0 <= m['f1'] <= 1.0 and 0.0 <= m['accuracy'] <= 1.0
  assert r['config']['eval']['mode'] == 'generate'
