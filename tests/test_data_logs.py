"""LogHub logs (fdlora_jax/data/logs.py): line parsing, windows, file
selection by pattern and system, malformed and undecodable lines, and
the skipped-line counts per file.

On the real samples in ../shared/data (see its README.md)."""

import json
import shutil

import pytest

from fdlora_jax import data
from fdlora_jax import errors
from fdlora_jax.data import logs
from fdlora_jax.data import synthetic
from tests.helpers import (LOGHUB, SPIRIT_JSON, bgl_line, logs_cfg,
                           medical_cfg, needs_shared, write_file)


@needs_shared
def test_bgl_lines_and_headers():
  stats = logs.ParseStats('BGL_2k.log')
  records = list(logs.parse_lines(logs.read_lines(LOGHUB / 'BGL_2k.log'),
                                  'BGL', stats))
  assert (stats.lines, stats.skipped, len(records)) == (2000, 0, 2000)
  assert sum(a for a, _ in records) == 143
  # Label, timestamps, node ids, type, component and level are dropped.
  assert records[0] == (False, 'instruction cache parity error corrected')
  assert not any('\r' in m for _, m in records)


@needs_shared
@pytest.mark.parametrize('size,windows,anomalous',
                         [(50, 40, 17), (10, 200, 40)])
def test_bgl_windows(size, windows, anomalous):
  task = data.load_task(logs_cfg(dir=str(LOGHUB), files='BGL_2k.log',
                                 window_size=size, window_stride=size), 0)
  assert len(task.examples) == windows
  assert sum(e.label for e in task.examples) == anomalous
  assert all(len(e.lines) == size for e in task.examples)
  assert task.examples[0].text == '\n'.join(task.examples[0].lines)
  assert task.data_source.startswith('real: ') and not task.is_synthetic
  assert task.metric == 'f1' and task.options.index('yes') == 1


@needs_shared
def test_files_take_glob_patterns():
  # A pattern names the sample (BGL_2k.log) and a full log (BGL.log) alike;
  # Spirit's pre-windowed JSON, which no pattern names, is left out.
  task = data.load_task(logs_cfg(dir=str(LOGHUB),
                                 files='BGL*.log,Thunderbird*.log',
                                 window_size=50, window_stride=50), 0)
  assert {e.source for e in task.examples} == {'BGL', 'Thunderbird'}
  assert len(task.examples) == 80
  assert 'BGL_2k.log' in task.data_source
  assert 'Thunderbird_2k.log' in task.data_source
  assert 'Spirit' not in task.data_source


@needs_shared
def test_logs_default_reads_every_labelled_line_of_both_systems():
  # configs/logs.py on ../shared/data: BGL and Thunderbird lines of loghub/
  # and loghub_random/, one per example, every line (no balanced subset),
  # both systems holding both labels.
  from configs import logs as logs_default  # pylint: disable=g-import-not-at-top
  cfg = logs_default.get_config().data
  cfg.dir = str(LOGHUB.parent)
  task = data.load_task(cfg, 0)
  assert len(task.examples) == 6000 and sum(task.labels()) == 243
  assert all(len(e.lines) == 1 and e.text == e.lines[0]
             for e in task.examples)
  assert {e.source for e in task.examples if e.label} == {
      'BGL', 'Thunderbird'}
  assert cfg.split == 'dedup' and not cfg.balance


@needs_shared
def test_systems_skip_other_files_and_refuse_a_named_one():
  task = data.load_task(logs_cfg(dir=str(LOGHUB), systems='BGL,Thunderbird',
                                 window_size=50, window_stride=50), 0)
  assert {e.source for e in task.examples} == {'BGL', 'Thunderbird'}
  assert 'Spirit' not in task.data_source
  spirit = data.load_task(logs_cfg(dir=str(LOGHUB), systems='Spirit'), 0)
  assert {e.source for e in spirit.examples} == {'Spirit'}
  assert len(spirit.examples) == 200
  with pytest.raises(errors.ConfigError, match=r'a Spirit log, but config'
                     r"\.data\.systems='BGL'"):
    data.load_task(logs_cfg(dir=str(LOGHUB), systems='BGL',
                            files='Spirit/alpaca_input_w-10_spirit.json'), 0)
  # The synthetic logs are made of the same systems.
  synth = data.load_task(logs_cfg(systems='BGL,Thunderbird'), 0)
  assert {e.source for e in synth.examples} == {'synthetic:BGL',
                                                 'synthetic:Thunderbird'}


@needs_shared
def test_a_dir_without_the_systems_files_is_refused(tmp_path):
  (tmp_path / 'Spirit').mkdir()
  shutil.copy(LOGHUB / 'Spirit' / 'alpaca_input_w-10_spirit.json',
              tmp_path / 'Spirit')
  with pytest.raises(errors.MissingFileError,
                     match="no log file of config.data.systems='BGL'"):
    data.load_task(logs_cfg(dir=str(tmp_path), systems='BGL'), 0)


@needs_shared
def test_overlapping_windows():
  stats = logs.ParseStats('x')
  records = logs.parse_lines(logs.read_lines(LOGHUB / 'BGL_2k.log'), 'BGL',
                             stats)
  got = list(logs.windows(records, 50, 25))
  assert len(got) == (2000 - 50) // 25 + 1


@needs_shared
def test_thunderbird_all_normal():
  stats = logs.ParseStats('Thunderbird_2k.log')
  records = list(logs.parse_lines(
      logs.read_lines(LOGHUB / 'Thunderbird_2k.log'), 'Thunderbird', stats))
  assert (len(records), stats.skipped) == (2000, 0)
  assert sum(a for a, _ in records) == 0
  assert records[0][1] == 'crond(pam_unix)[2915]: session closed for user root'


@needs_shared
def test_spirit_json():
  stats = logs.ParseStats('spirit')
  examples = logs.spirit_json_examples(SPIRIT_JSON, stats)
  assert len(examples) == 200 and stats.skipped == 0
  assert sum(e.label for e in examples) == 68
  assert all(len(e.lines) == 10 for e in examples)
  assert examples[0].lines[0].startswith('dhcpd: DHCPDISCOVER from')
  assert 'Question' not in examples[0].text


@needs_shared
def test_loghub_dir_mixes_systems():
  task = data.load_task(logs_cfg(dir=str(LOGHUB)), 0)
  sources = [e.source for e in task.examples]
  assert (sources.count('BGL'), sources.count('Thunderbird'),
          sources.count('Spirit')) == (40, 40, 200)
  assert data.class_counts(task) == {'no': 195, 'yes': 85}
  assert str((LOGHUB / 'BGL_2k.log').resolve()) in task.data_source


def test_missing_dir_names_path_and_source(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='github.com/logpai/loghub') as e:
    data.load_task(logs_cfg(dir=str(missing)), 0)
  assert str(missing) in str(e.value)
  with pytest.raises(FileNotFoundError, match='BGL_9k.log'):
    data.load_task(logs_cfg(dir=str(tmp_path), files='BGL_9k.log'), 0)
  with pytest.raises(FileNotFoundError, match='no log files'):
    data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  with pytest.raises(FileNotFoundError, match=r'no log file matches .*BGL\*'):
    data.load_task(logs_cfg(dir=str(tmp_path), files='BGL*.log'), 0)


def test_malformed_lines_skipped_counted_reported(tmp_path, caplog):
  lines = [bgl_line() for _ in range(6)]
  lines[2] = 'garbage'
  lines[4] = '- notanumber 2005.06.03 x y z RAS KERNEL INFO m'
  path = tmp_path / 'BGL_bad.log'
  path.write_bytes(('\r\n'.join(lines) + '\r\n\r\n').encode())
  task = data.load_task(logs_cfg(dir=str(tmp_path), window_size=2,
                                 window_stride=2), 0)
  assert task.skipped_lines == 3  # two bad lines and the blank one
  assert len(task.examples) == 2
  assert 'skipped 3 malformed' in caplog.text


def test_empty_or_invalid_file_is_an_error(tmp_path):
  (tmp_path / 'BGL_empty.log').write_bytes(b'')
  with pytest.raises(ValueError, match='BGL_empty.log: file is empty'):
    data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  (tmp_path / 'BGL_empty.log').write_bytes(b'junk\nmore junk\n')
  with pytest.raises(ValueError, match='no valid lines'):
    data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  (tmp_path / 'BGL_empty.log').write_text(bgl_line() + '\n')
  with pytest.raises(ValueError, match='fewer than one window of 50'):
    data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  (tmp_path / 'BGL_empty.log').unlink()
  (tmp_path / 'chemprot_x.jsonl').write_text('\n')
  with pytest.raises(ValueError, match='chemprot_x.jsonl: file is empty'):
    data.load_task(medical_cfg('chemprot', dir=str(tmp_path)), 0)


def test_undecodable_bytes_do_not_crash(tmp_path):
  raw = bgl_line('KERNDTLB', 'data TLB error \xff').encode('latin-1')
  path = tmp_path / 'BGL_bytes.log'
  path.write_bytes(raw + b'\n' + bgl_line().encode() + b'\xfe\xfd')
  task = data.load_task(logs_cfg(dir=str(tmp_path), window_size=2,
                                 window_stride=2), 0)
  assert task.examples[0].label == 1
  assert task.examples[0].lines[0] == 'data TLB error \ufffd'


def test_log_system_sniffed_from_content(tmp_path):
  (tmp_path / 'x.log').write_text('\n'.join(
      synthetic.synthetic_lines('Thunderbird', 20, seed=1, block=10)))
  task = data.load_task(logs_cfg(dir=str(tmp_path), files='x.log',
                                 window_size=10, window_stride=10), 0)
  assert [e.source for e in task.examples] == ['Thunderbird'] * 2
  assert task.examples[0].lines[0].split('[')[0] in {
      t.split('[')[0].split(':')[0] for t in
      synthetic.SYSTEMS['Thunderbird']['normal'] +
      [a[1] for a in synthetic.SYSTEMS['Thunderbird']['anomalous']]}


@needs_shared
def test_skipped_lines_per_file_reach_partition_json(tmp_path):
  lines = (LOGHUB / 'BGL_2k.log').read_bytes().split(b'\r\n')
  assert len(lines) == 2000
  for at, bad in ((0, b'garbage'), (1000, b''),
                  (1500, b'- notanumber 2005.06.03 R02 x y z RAS KERNEL m')):
    lines.insert(at, bad)
  bgl = write_file(tmp_path / 'BGL_inj.log', b'\r\n'.join(lines))
  thunderbird = write_file(tmp_path / 'Thunderbird_2k.log',
                       (LOGHUB / 'Thunderbird_2k.log').read_bytes())
  windows = json.loads(SPIRIT_JSON.read_text())
  windows[5:5] = [{'conversation': [{'input': 'a', 'output': 'maybe'}]},
                  {'no conversation': 1}]
  spirit = write_file(tmp_path / 'Spirit' / 'w.json',
                      json.dumps(windows).encode())
  task = data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  expected = {str(bgl.resolve()): 3, str(thunderbird.resolve()): 0,
              str(spirit.resolve()): 2}
  assert task.skipped_by_file == expected
  assert task.skipped_lines == 5
  assert data.class_counts(task) == {'no': 195, 'yes': 85}  # as unmodified
  part = data.partition(task, 3, logs_cfg(), seed=0)
  data.write_partition(tmp_path / 'run' / 'partition.json', part, task)
  info = json.loads((tmp_path / 'run' / 'partition.json').read_text())
  assert info['skipped_lines'] == expected
