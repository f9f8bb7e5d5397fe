"""The user-facing errors (fdlora_jax/errors.py) and the command lines that
print them: one line, exit status 2; anything else keeps its traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import tiny
from fdlora_jax import checkpoint, run
from fdlora_jax.errors import (ConfigError, DataError, UserError,
                               exit_on_user_error, fail, need)
from fdlora_jax.fl.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_need_names_the_field_and_value():
  need(True, 'fl.rounds', 3, 'must be > 0')
  with pytest.raises(ConfigError, match=r"^config\.fl\.rounds=0: must be > 0$"):
    need(False, 'fl.rounds', 0, 'must be > 0')


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    fail('data.dir=/x:\n  no such   directory')
  assert e.value.code == 2
  assert capsys.readouterr().err == 'error: data.dir=/x: no such directory\n'


def test_exit_on_user_error_catches_user_errors_only(capsys):
  with pytest.raises(SystemExit) as e:
    with exit_on_user_error():
      raise DataError('BGL.log: empty')
  assert e.value.code == 2
  assert capsys.readouterr().err == 'error: BGL.log: empty\n'
  with pytest.raises(ZeroDivisionError):       # a bug: not turned into exit 2
    with exit_on_user_error():
      1 / 0
  with exit_on_user_error():
    pass


@pytest.mark.parametrize('argv, says', [
    (['-m', 'fdlora_jax.report'], '--workdir is required'),
    (['-m', 'fdlora_jax.report', '--workdir={tmp}'], 'no suite.json'),
    (['-m', 'fdlora_jax.suite', '--workdir={tmp}'],
     '--suite and --workdir are required'),
    (['-m', 'fdlora_jax.suite', '--suite={tmp}/none.py', '--workdir={tmp}/w'],
     'none.py: suite or config file not found'),
])
def test_suite_and_report_command_lines_fail_in_one_line(tmp_path, argv, says):
  argv = [a.format(tmp=tmp_path) for a in argv]
  proc = subprocess.run([sys.executable, *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(err) == 1 and says in err[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


def one_error_line(argv, cwd=REPO):
  """Runs ``python *argv``; asserts exit status 2, one ``error:`` line on
  stderr and no traceback; returns that line."""
  proc = subprocess.run([sys.executable, *argv], cwd=cwd,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(err) == 1, proc.stderr[-2000:]
  return err[0]


# Without --config, ml_collections applies the overrides to the default
# config while main.py defines the flag; with it, while absl parses argv.
@pytest.mark.parametrize('config', [['--config=configs/tiny.py'], []])
@pytest.mark.parametrize('override, says', [
    ('--config.fl.roundz=3',
     'error: config.fl.roundz: no such field (did you mean fl.rounds?)'),
    ('--config.fdlora.fuson.steps=3', 'did you mean fdlora.fusion.steps'),
    ('--config.zz.yy=3', 'error: config.zz.yy: no such field'),
    ('--config.fl.rounds=abc', '--config.fl.rounds=abc: invalid literal'),
])
def test_main_py_bad_override_is_one_line(tmp_path, config, override, says):
  line = one_error_line(['main.py', *config, override,
                         f'--workdir={tmp_path}/w'])
  assert says in line
  assert not (tmp_path / 'w').exists()


def test_main_py_bad_fusion_field_is_one_line(tmp_path):
  line = one_error_line(['main.py', '--config=configs/tiny.py',
                         '--config.fdlora.fusion.steps=0',
                         f'--workdir={tmp_path}/w'])
  assert line == 'error: config.fdlora.fusion.steps=0: must be >= 1'
  assert not (tmp_path / 'w').exists()


# One bad value of one field of each method's own block.
BAD_METHOD_FIELD = {
    'fdlora': ('outer_lr', 0.0),
    'fedavg': ('server_lr', 0.0),
    'fedamp': ('self_weight', 2.0),
    'fedkd': ('mentee_rank', 0),
    'k_shot': ('shots', 0),
    'fedrep': ('head_steps', 0),
    'fedrod': ('head_layers', -1),
    'pfedlora': ('shared_rank', 0),
    'fedlora_opt': ('weighting', 'median'),
    'ffa_lora': ('weighting', 'median'),
    'fedsa_lora': ('weighting', 'median'),
    'rolora': ('weighting', 'median'),
    'fedex_lora': ('weighting', 'median'),
    'flora': ('ranks', (8, 0)),
    'flexlora': ('ranks', (-4,)),
    'feddpa': ('max_weight', 0.0),
}
BAD_FUSION_FIELD = [
    ('strategy', 'CMAES'), ('population_size', 1), ('steps', 0),
    ('bounds', (1.0, -1.0)), ('init', (2.0, 0.0)), ('sigma_init', 0.0),
    ('lam', -1.0), ('baselines', ('median',)),
]


def method_config(name):
  c = tiny.get_config()
  c.method = name
  c[name] = METHODS[name].config()
  METHODS[name].validate(c)         # the defaults pass
  return c


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_method_rejects_a_bad_field_as_a_user_error(name):
  c = method_config(name)
  if not c[name]:                   # no fields of its own
    assert name not in BAD_METHOD_FIELD
    return
  assert name in BAD_METHOD_FIELD, f'add a bad field of {name} here'
  field, value = BAD_METHOD_FIELD[name]
  c[name][field] = value
  with pytest.raises(UserError, match=rf'{name}\.{field}='):
    METHODS[name].validate(c)


@pytest.mark.parametrize('field, value', BAD_FUSION_FIELD + [
    ('population_size', 7)])        # with Open_ES: needs an even population
def test_fdlora_rejects_a_bad_fusion_field_as_a_user_error(field, value):
  c = method_config('fdlora')
  if field == 'population_size' and value == 7:
    c.fdlora.fusion.strategy = 'Open_ES'
  c.fdlora.fusion[field] = value
  with pytest.raises(UserError, match=rf'config\.fdlora\.fusion\.{field}='):
    METHODS['fdlora'].validate(c)


@pytest.mark.parametrize('field, value', [
    ('lora.dropout', 1.5), ('model.attention', 'flash'),
    ('model.dtype', 'float99'), ('model.param_dtype', 'int8')])
def test_run_checks_the_fields_the_model_reads(field, value):
  c = method_config('fedavg')
  group, name = field.split('.')
  c[group][name] = value
  with pytest.raises(ConfigError, match=rf'config\.{group}\.{name}='):
    run.validate_config(c)


@pytest.mark.parametrize('change, says', [
    ({'num_key_value_heads': 3}, 'num_key_value_heads'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 2.0}}, "'yarn'"),
])
def test_a_bad_checkpoint_config_json_is_a_user_error(tmp_path, change, says):
  hf = {'model_type': 'llama', 'vocab_size': 96, 'hidden_size': 32,
        'intermediate_size': 64, 'num_hidden_layers': 2,
        'num_attention_heads': 4, **change}
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(checkpoint.CheckpointError, match=says):
    checkpoint.load_hf_config(tmp_path)


@pytest.mark.parametrize('override', [[], ['--config.fl.rounds=1']])
def test_main_py_missing_config_file_is_one_line(tmp_path, override):
  """With or without an override (ml_collections loads the file at parse
  time or when the value is first read), a config file that does not exist
  is one line naming it, not a traceback."""
  line = one_error_line(['main.py', '--config=configs/nope.py', *override,
                         f'--workdir={tmp_path}/w'])
  assert line == 'error: --config=configs/nope.py: no such config file'
  assert not (tmp_path / 'w').exists()
