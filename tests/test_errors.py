"""The user-facing errors (fdlora_jax/errors.py) and the command lines that
print them: one line, exit status 2; anything else keeps its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from fdlora_jax.errors import (ConfigError, DataError,
                               exit_on_user_error, fail, need)

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
