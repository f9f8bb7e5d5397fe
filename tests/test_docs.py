"""README.md and docs/: every measured figure comes from its results file,
and every code block runs (or says why not)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import publish  # noqa: E402  (benchmarks/ is not a package)

PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```$', re.S | re.M)
MARK = re.compile(r'<!-- (?P<kind>not run:|tested in|run:) ?(?P<arg>[^>]*?) -->'
                  r'\n\s*$')
# A figure that describes a measurement: a number with a unit of time,
# memory, size or rate, a percentage, or a score with three decimals. An
# interval's confidence level ("a 95% interval") is a setting, not a
# measurement.
MEASURE = re.compile(
    r'(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|minutes|hours|GiB|MiB|GB|MB'
    r'|TFLOP/s|GFLOP/s|tok/s|tokens/s'
    r'|%(?!\s+(?:t\s+|bootstrap\s+)?interval))(?![\w/])'
    r'|(?<![\w.])0\.\d{3,}\b')


def blocks(page):
  """(language, code, the marker before it or None, inside a figures block)."""
  text = page.read_text()
  generated = [m.span() for m in publish.BLOCK.finditer(text)]
  out = []
  for m in FENCE.finditer(text):
    before = text[:m.start()]
    mark = MARK.search(before[-300:])
    inside = any(a <= m.start() < b for a, b in generated)
    out.append((m.group('lang'), m.group('code'),
                mark.groupdict() if mark else None, inside))
  return out


def prose(text):
  """The page without generated blocks, fenced code and inline code."""
  text = publish.BLOCK.sub('', text)
  text = FENCE.sub('', text)
  return re.sub(r'`[^`\n]*`', '', text)


def test_published_figures_match_their_results_files():
  assert publish.main(['--check']) == 0


def test_check_fails_when_one_digit_in_a_page_changes(tmp_path, capsys):
  text = (REPO / 'docs' / 'results.md').read_text()
  m = next(publish.BLOCK.finditer(text))
  body_start = m.start('body')
  digit = re.search(r'\d', text[body_start:]).start() + body_start
  changed = str((int(text[digit]) + 1) % 10)
  page = tmp_path / 'results.md'
  page.write_text(text[:digit] + changed + text[digit + 1:])
  assert publish.main(['--check', str(page)]) == 1
  assert 'disagree with their results files' in capsys.readouterr().err
  page.write_text(text)
  assert publish.main(['--check', str(page)]) == 0


def test_every_block_names_a_known_renderer():
  for page in PAGES:
    for m in publish.BLOCK.finditer(page.read_text()):
      assert m.group('name') in publish.RENDERERS, (page, m.group('name'))


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_no_measured_figure_outside_a_generated_block(page):
  """Prose carries no measurement of its own: those live in generated
  blocks, written from results files. A page that needs one adds a renderer
  to benchmarks/publish.py."""
  stray = MEASURE.findall(prose(page.read_text()))
  assert not stray, (f'{page.name}: figures outside a generated block: '
                     f'{stray}')


def test_the_figure_lint_catches_a_stray_figure():
  assert MEASURE.findall(prose('FDLoRA took 395 s and scored 0.983.\n')) == [
      '395 s', '0.983']
  assert not MEASURE.findall(prose('rank 8 on q_proj, alpha 0.5, 2e-4.\n'))
  assert MEASURE.findall(prose('about 4% of lines, a 95% interval\n')) == [
      '4%']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_code_block_is_run_or_marked(page):
  for lang, code, mark, inside in blocks(page):
    if inside:       # the output of a command, written with its figures
      continue
    if lang == 'python' and mark is None:
      continue       # run by test_python_blocks_run
    assert mark is not None, (
        f'{page.name}: a ```{lang} block with no marker: add '
        f'<!-- not run: why --> or make it runnable:\n{code[:200]}')
    if mark['kind'] == 'not run:':
      assert len(mark['arg'].strip()) > 5, f'{page.name}: give the reason'
    elif mark['kind'] == 'tested in':
      path = REPO / mark['arg'].strip()
      assert path.is_file(), f'{page.name}: {path} does not exist'
      assert page.name in path.read_text(), (
          f'{path} does not read {page.name}')
    else:
      assert mark['arg'].strip() == 'console' and lang == 'console', mark


def python_blocks():
  return [(page, code) for page in PAGES
          for lang, code, mark, inside in blocks(page)
          if lang == 'python' and mark is None and not inside]


@pytest.mark.parametrize('page,code', python_blocks(),
                         ids=lambda x: getattr(x, 'name', ''))
def test_python_blocks_run(page, code, tmp_path):
  script = tmp_path / 'block.py'
  script.write_text(code)
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f'{page.name}:\n{proc.stderr[-3000:]}'


def console_blocks():
  return [(page, code) for page in PAGES
          for lang, code, mark, inside in blocks(page)
          if mark and mark['kind'] == 'run:']


@pytest.mark.parametrize('page,code', console_blocks(),
                         ids=lambda x: getattr(x, 'name', ''))
def test_console_blocks_print_what_they_show(page, code, tmp_path):
  """Each ``$ command`` runs in the repository root (with the workdir in a
  temporary directory) and prints exactly the lines shown after it."""
  steps = re.findall(r'^\$ (.*)\n((?:(?!\$ ).*\n)*)', code, re.M)
  assert steps, code
  for command, expected in steps:
    if command.startswith('python '):    # this interpreter, as in the venv
      command = f'{sys.executable} {command[len("python "):]}'
    proc = subprocess.run(
        command + f' --workdir={tmp_path / "w"}', shell=True, cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env={**__import__('os').environ, 'PYTHON': sys.executable})
    shown = (proc.stdout + proc.stderr).strip()
    assert shown == expected.strip(), (command, shown)
    assert proc.returncode == 2, (command, proc.returncode)
    assert not (tmp_path / 'w').exists(), f'{command} wrote its workdir'
