"""Data tests on the real samples in ../shared/data (see its README.md)."""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

from configs import common
from fdlora_jax import data
from fdlora_jax import errors
from fdlora_jax import tokenizer as tokenizer_lib
from fdlora_jax.data import logs
from fdlora_jax.data.partition import few_shot_draw
from fdlora_jax.data.partition import train_test_split
from fdlora_jax.data import synthetic
from fdlora_jax.data import tokenize

SHARED = pathlib.Path(__file__).parents[1].parent / 'shared' / 'data'
LOGHUB = SHARED / 'loghub'
MEDICAL = SHARED / 'medical'
SPIRIT_JSON = LOGHUB / 'Spirit' / 'alpaca_input_w-10_spirit.json'

needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f'{SHARED} is absent')


def logs_cfg(**data_fields):
  c = common.logs_data(common.base_config())
  c.data.update(data_fields)
  return c.data


def medical_cfg(task, **data_fields):
  c = common.medical_data(common.base_config(), task)
  c.data.dir = str(MEDICAL)
  c.data.update(data_fields)
  return c.data


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  task = data.load_task(logs_cfg(), seed=0)
  texts = data.tokenizer_texts(task, logs_cfg())
  return tokenizer_lib.embedded_tokenizer(
      texts, 512, str(tmp_path_factory.mktemp('tok')))


# ---- Log parsing and windows ----------------------------------------------


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
def test_logs_default_reads_one_balanced_line_per_example():
  # configs/logs.py on the samples: BGL and Thunderbird lines, one per
  # example, every anomalous BGL line (143) and as many normal ones.
  from configs import logs as logs_default  # pylint: disable=g-import-not-at-top
  cfg = logs_default.get_config().data
  cfg.dir = str(LOGHUB)
  task = data.load_task(cfg, 0)
  assert len(task.examples) == 286 and sum(task.labels()) == 143
  assert {e.source for e in task.examples} == {'BGL', 'Thunderbird'}
  assert all(len(e.lines) == 1 and e.text == e.lines[0]
             for e in task.examples)
  assert all(e.source == 'BGL' for e in task.examples if e.label)
  assert 'balanced: 143 per label' in task.data_source


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


def test_log_prompt_template():
  example = data.Example('a\nb', ('no', 'yes'), 1, 'BGL', ('a', 'b'))
  assert data.build_prompt(example, logs_cfg().template, logs_cfg()) == (
      'Below is a system log question and relevant logs are provided. Write '
      'a response that appropriately answer the question. Let us think step '
      'by step, just output the final answer.\n\n### Is there an anomaly in '
      'the following system logs? Answer yes or no.\na\nb\n\n### Response:')


# ---- Bad input --------------------------------------------------------------


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


def test_missing_medical_file_names_source(tmp_path):
  with pytest.raises(FileNotFoundError, match='pubmedqa') as e:
    data.load_task(medical_cfg('pubmedqa', dir=str(tmp_path)), 0)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match='no built-in data'):
    data.load_task(medical_cfg('chemprot', dir=''), 0)


def _bgl_line(label='-', msg='instruction cache parity error corrected'):
  return (f'{label} 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 '
          f'2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO '
          f'{msg}')


def test_malformed_lines_skipped_counted_reported(tmp_path, caplog):
  lines = [_bgl_line() for _ in range(6)]
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
  (tmp_path / 'BGL_empty.log').write_text(_bgl_line() + '\n')
  with pytest.raises(ValueError, match='fewer than one window of 50'):
    data.load_task(logs_cfg(dir=str(tmp_path)), 0)
  (tmp_path / 'BGL_empty.log').unlink()
  (tmp_path / 'chemprot_x.jsonl').write_text('\n')
  with pytest.raises(ValueError, match='chemprot_x.jsonl: file is empty'):
    data.load_task(medical_cfg('chemprot', dir=str(tmp_path)), 0)


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def _random_bytes(n=4096):
  return np.random.default_rng(0).integers(0, 256, n, np.uint8).tobytes()


# Each case: (setup(tmp_path) -> (call, what the message must name)), type.
_BAD_INPUT = {
    'empty_log': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(_write(t / 'BGL_empty.log', b'').resolve())), errors.DataError),
    'binary_log': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(_write(t / 'BGL_x.log', _random_bytes()).resolve())),
                   errors.DataError),
    'binary_spirit_json': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(_write(t / 'Spirit' / 'x.json', _random_bytes()).resolve())),
                           errors.DataError),
    'missing_dir': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t / 'nope')), 0),
        f"config.data.dir='{t / 'nope'}'"), errors.MissingFileError),
    'missing_file': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t), files='BGL_9k.log'), 0),
        "config.data.files='BGL_9k.log'"), errors.MissingFileError),
    'missing_medical_dir': (lambda t: (
        lambda: data.load_task(medical_cfg('pubmedqa', dir=str(t / 'no')), 0),
        'config.data.dir='), errors.MissingFileError),
    'binary_pubmedqa': (lambda t: (
        lambda: data.load_task(medical_cfg('pubmedqa', dir=str(t)), 0),
        str(_write(t / 'pubmedqa_x.json', _random_bytes()).resolve())),
                        errors.DataError),
    'binary_chemprot': (lambda t: (
        lambda: data.load_task(medical_cfg('chemprot', dir=str(t)), 0),
        str(_write(t / 'chemprot_x.jsonl', _random_bytes()).resolve())),
                        errors.DataError),
    'binary_mqp_csv': (lambda t: (
        lambda: data.load_task(medical_cfg('mqp', dir=str(t)), 0),
        str(_write(t / 'mqp_x.csv', _random_bytes()).resolve())),
                       errors.DataError),
    'unknown_task': (lambda t: (
        lambda: data.load_task(logs_cfg(task='nope'), 0),
        "config.data.task='nope'"), errors.ConfigError),
    'window_size': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t), window_size=0), 0),
        'config.data.window_size=0'), errors.ConfigError),
    'systems': (lambda t: (
        lambda: data.load_task(logs_cfg(systems='BGL,HDFS'), 0),
        "config.data.systems='BGL,HDFS'"), errors.ConfigError),
}


@pytest.mark.parametrize('case', sorted(_BAD_INPUT))
def test_bad_input_is_a_one_line_user_error(tmp_path, case):
  setup, kind = _BAD_INPUT[case]
  call, named = setup(tmp_path)
  with pytest.raises(kind) as e:
    call()
  message = str(e.value)
  assert isinstance(e.value, errors.UserError)
  assert named in message
  assert '\n' not in message and len(message.splitlines()) == 1


def test_bad_partition_and_length_config_are_config_errors(tok):
  task = data.load_task(logs_cfg(), 0)
  for field, value in (('partition', 'iid'), ('dirichlet_alpha', 0.0),
                       ('train_fraction', 1.5),
                       ('min_examples_per_client', 1000)):
    with pytest.raises(errors.ConfigError, match=f'config.data.{field}='):
      data.partition(task, 3, logs_cfg(**{field: value}), seed=0)
  with pytest.raises(errors.ConfigError, match='config.data.max_length=16'):
    data.encode_options(tok, task, [np.arange(2)], logs_cfg(max_length=16))


def test_undecodable_bytes_do_not_crash(tmp_path):
  raw = _bgl_line('KERNDTLB', 'data TLB error \xff').encode('latin-1')
  path = tmp_path / 'BGL_bytes.log'
  path.write_bytes(raw + b'\n' + _bgl_line().encode() + b'\xfe\xfd')
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
  bgl = _write(tmp_path / 'BGL_inj.log', b'\r\n'.join(lines))
  thunderbird = _write(tmp_path / 'Thunderbird_2k.log',
                       (LOGHUB / 'Thunderbird_2k.log').read_bytes())
  windows = json.loads(SPIRIT_JSON.read_text())
  windows[5:5] = [{'conversation': [{'input': 'a', 'output': 'maybe'}]},
                  {'no conversation': 1}]
  spirit = _write(tmp_path / 'Spirit' / 'w.json', json.dumps(windows).encode())
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


@needs_shared
def test_skipped_records_per_medical_file(tmp_path):
  records = json.loads((MEDICAL / 'pubmedqa_pqal_test500.json').read_text())
  pmids = list(records)
  del records[pmids[0]]['final_decision']  # looked up in the truth file
  del records[pmids[1]]['final_decision']  # not there either: skipped
  main = _write(tmp_path / 'pubmedqa_x.json', json.dumps(records).encode())
  truth = {pmids[0]: 'yes', 'other': 'perhaps', 'more': 3}
  truth_file = _write(tmp_path / 'x_ground_truth.json',
                      json.dumps(truth).encode())
  task = data.load_task(medical_cfg('pubmedqa', dir=str(tmp_path)), 0)
  assert len(task.examples) == 499
  assert task.skipped_by_file == {str(main.resolve()): 1,
                                  str(truth_file.resolve()): 2}
  assert task.skipped_lines == 3
  assert data.load_task(logs_cfg(), 0).skipped_by_file == {}  # synthetic


# ---- Synthetic --------------------------------------------------------------


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


# ---- Medical ----------------------------------------------------------------


@needs_shared
def test_pubmedqa():
  task = data.load_task(medical_cfg('pubmedqa'), 0)
  assert len(task.examples) == 500
  assert data.class_counts(task) == {'yes': 276, 'no': 169, 'maybe': 55}
  assert task.metric == 'accuracy'
  prompt = data.build_prompt(task.examples[0], medical_cfg('pubmedqa')
                             .template, medical_cfg('pubmedqa'))
  assert prompt.startswith('Question: Is anorectal endosonography valuable')
  assert prompt.endswith('Options:\n- yes\n- no\n- maybe\nAnswer:')


@needs_shared
def test_balance_keeps_the_rarest_labels_count_of_each():
  full = data.load_task(medical_cfg('pubmedqa'), 0)
  task = data.load_task(medical_cfg('pubmedqa', balance=True), 0)
  assert data.class_counts(task) == {'yes': 55, 'no': 55, 'maybe': 55}
  assert 'balanced: 55 per label of 3, seed 0' in task.data_source
  texts = [e.text for e in full.examples]
  order = [texts.index(e.text) for e in task.examples]
  assert order == sorted(order)          # a subset, in file order
  maybe = {e.text for e in full.examples if e.options[e.label] == 'maybe'}
  assert maybe <= {e.text for e in task.examples}   # the rarest: all kept
  other = data.load_task(medical_cfg('pubmedqa', balance=True), 1)
  assert [e.text for e in other.examples] != [e.text for e in task.examples]
  both = data.load_task(medical_cfg('pubmedqa', balance=True,
                                    max_examples=30), 0)
  assert len(both.examples) == 30
  assert {e.text for e in both.examples} <= {e.text for e in task.examples}


@needs_shared
def test_pubmedqa_ground_truth_file(tmp_path):
  records = json.loads((MEDICAL / 'pubmedqa_pqal_test500.json').read_text())
  for r in records.values():
    del r['final_decision']
  (tmp_path / 'pubmedqa_x.json').write_text(json.dumps(records))
  (tmp_path / 'pubmedqa_test_ground_truth.json').write_bytes(
      (MEDICAL / 'pubmedqa_test_ground_truth.json').read_bytes())
  task = data.load_task(medical_cfg('pubmedqa', dir=str(tmp_path)), 0)
  assert data.class_counts(task) == {'yes': 276, 'no': 169, 'maybe': 55}


@needs_shared
def test_chemprot():
  task = data.load_task(medical_cfg('chemprot'), 0)
  assert len(task.examples) == 266 and len(task.options) == 12
  assert task.metric == 'micro_f1'
  assert sorted(data.class_counts(task).values())[:2] == [4, 12]
  assert '<< Androgen >>' in task.examples[0].text


def test_rct_mqp_usmle_readers(tmp_path):
  (tmp_path / 'rct_test.txt').write_text(
      '###123\nOBJECTIVE\tTo test x .\nMETHODS\tWe did y .\nBAD LINE\n\n'
      '###456\nRESULTS\tIt worked .\n')
  task = data.load_task(medical_cfg('rct', dir=str(tmp_path)), 0)
  assert [e.answer for e in task.examples] == ['OBJECTIVE', 'METHODS',
                                               'RESULTS']
  assert task.skipped_lines == 1 and task.metric == 'micro_f1'

  (tmp_path / 'mqp.csv').write_text(
      'dr_id,question_1,question_2,label\n1,Is it flu?,Do I have flu?,1\n'
      '1,Is it flu?,Is it a cold?,0\n2,,x,1\n')
  task = data.load_task(medical_cfg('mqp', dir=str(tmp_path)), 0)
  assert [e.answer for e in task.examples] == ['similar', 'dissimilar']
  assert task.skipped_lines == 1
  (tmp_path / 'mqp.csv').unlink()
  (tmp_path / 'mqp.jsonl').write_text(json.dumps(
      {'question_1': 'a?', 'question_2': 'b?', 'label': 'dissimilar'}) + '\n')
  task = data.load_task(medical_cfg('mqp', dir=str(tmp_path)), 0)
  assert task.examples[0].text == 'Question 1: a?\nQuestion 2: b?'

  rows = [{'question': 'Best drug?', 'options': {'A': 'x', 'B': 'y', 'C': 'z',
                                                 'D': 'w'}, 'answer_idx': 'C'},
          {'question': 'Broken', 'options': {'A': 'x'}, 'answer_idx': 'A'},
          {'question': 'Second?', 'options': {'A': 'p', 'B': 'q', 'C': 'r',
                                              'D': 's'}, 'answer_idx': 'A'}]
  (tmp_path / 'usmle_test.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in rows) + '\nnot json\n')
  task = data.load_task(medical_cfg('usmle', dir=str(tmp_path)), 0)
  assert task.options == ('A', 'B', 'C', 'D')
  assert [e.label for e in task.examples] == [2, 0]
  assert task.skipped_lines == 2
  cfg = medical_cfg('usmle')
  assert data.build_prompt(task.examples[0], cfg.template, cfg) == (
      'Best drug?\nOptions:\nA. x\nB. y\nC. z\nD. w\nAnswer:')


# ---- Partition --------------------------------------------------------------


def _label_entropy(task, part):
  labels, out = task.labels(), []
  for i in range(part.num_clients):
    idx = np.concatenate([part.train[i], part.test[i]])
    q = np.bincount(labels[idx], minlength=len(task.options)) / len(idx)
    q = q[q > 0]
    out.append(-(q * np.log(q)).sum())
  return float(np.mean(out))


@needs_shared
def test_dirichlet_partition_deterministic_and_complete():
  task = data.load_task(medical_cfg('pubmedqa'), 0)
  cfg = medical_cfg('pubmedqa')
  a = data.partition(task, 5, cfg, seed=7)
  b = data.partition(task, 5, cfg, seed=7)
  c = data.partition(task, 5, cfg, seed=8)
  assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test +
                                                  a.few_shot,
                                                  b.train + b.test +
                                                  b.few_shot))
  assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))
  everything = np.concatenate(a.train + a.test)
  assert np.array_equal(np.sort(everything), np.arange(500))  # once each
  for i in range(5):
    n = len(a.train[i]) + len(a.test[i])
    assert n >= cfg.min_examples_per_client
    assert len(a.test[i]) == max(1, round(0.2 * n))
    assert len(a.few_shot[i]) == min(5, len(a.train[i]))
    assert set(a.few_shot[i]) <= set(a.train[i])


@needs_shared
def test_smaller_alpha_more_skew():
  task = data.load_task(medical_cfg('pubmedqa'), 0)
  means = []
  for alpha in (0.1, 0.5, 1.0):
    cfg = medical_cfg('pubmedqa', dirichlet_alpha=alpha)
    means.append(np.mean([_label_entropy(task, data.partition(task, 5, cfg, s))
                          for s in range(10)]))
  # Mean per-client label entropy (nats, 3 classes), seeds 0..9.
  np.testing.assert_allclose(means, [0.3389, 0.6442, 0.7463], atol=2e-3)
  assert means[0] < means[1] < means[2]


def test_min_examples_rebalance():
  examples = [data.Example('x', ('no', 'yes'), int(i < 3), 's')
              for i in range(40)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  cfg = logs_cfg(dirichlet_alpha=0.01, min_examples_per_client=6)
  part = data.partition(task, 5, cfg, seed=0)
  sizes = [len(a) + len(b) for a, b in zip(part.train, part.test)]
  assert min(sizes) >= 6 and sum(sizes) == 40
  with pytest.raises(ValueError, match='min_examples_per_client=9'):
    data.partition(task, 5, logs_cfg(min_examples_per_client=9), seed=0)


def test_stratified_split_puts_each_repeated_label_in_test():
  # 60 examples, 6 anomalous, Dir(0.5) over 5 clients: the plain split
  # leaves some clients' anomalies all in train; the stratified split does
  # not, and keeps the same clients' examples (only the split changes).
  examples = [data.Example('x', ('no', 'yes'), int(i % 10 == 0), 's')
              for i in range(60)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  labels = task.labels()
  missed = 0
  for seed in range(20):
    plain = data.partition(task, 5, logs_cfg(), seed)
    strat = data.partition(task, 5, logs_cfg(stratify=True), seed)
    assert 'stratified' in strat.method and 'stratified' not in plain.method
    for i in range(5):
      client = np.concatenate([strat.train[i], strat.test[i]])
      assert np.array_equal(np.sort(client), np.sort(np.concatenate(
          [plain.train[i], plain.test[i]])))
      assert len(np.intersect1d(strat.train[i], strat.test[i])) == 0
      assert set(strat.few_shot[i]) <= set(strat.train[i])
      for k in (0, 1):
        held = int((labels[client] == k).sum())
        in_test = int((labels[strat.test[i]] == k).sum())
        if held >= 2:
          assert 1 <= in_test <= held - 1, (seed, i, k, held, in_test)
          assert in_test == min(max(round(0.2 * held), 1), held - 1)
      plain_yes = (labels[plain.test[i]] == 1).sum()
      held_yes = (labels[np.concatenate([plain.train[i], plain.test[i]])]
                  == 1).sum()
      missed += int(held_yes >= 2 and plain_yes == 0)
  assert missed > 0  # the plain split does miss them: the test is not empty


def test_stratified_split_of_singletons_keeps_one_each_side():
  idx = np.array([3, 8])
  labels = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0])  # idx: one of each label
  tr, te = train_test_split(
      idx, 0.8, np.random.default_rng(0), labels)
  assert len(tr) == 1 and len(te) == 1 and set(tr) | set(te) == {3, 8}


@needs_shared
def test_partition_by_source_and_json(tmp_path):
  task = data.load_task(logs_cfg(dir=str(LOGHUB)), 0)
  cfg = logs_cfg(dir=str(LOGHUB), partition='source')
  part = data.partition(task, 3, cfg, seed=0)
  for i, name in enumerate(['BGL', 'Spirit', 'Thunderbird']):
    idx = np.concatenate([part.train[i], part.test[i]])
    assert {task.examples[j].source for j in idx} == {name}
  data.write_partition(tmp_path / 'run' / 'partition.json', part, task)
  info = json.loads((tmp_path / 'run' / 'partition.json').read_text())
  assert info['clients'][0]['sources'] == {'BGL': 40}
  assert info['clients'][0]['class_counts']['train']['yes'] + info[
      'clients'][0]['class_counts']['test']['yes'] == 17
  assert info['data_source'] == task.data_source
  table = part.table(task)
  assert 'BGL:40' in table and 'client' in table and 'real:' in table



def test_stratified_few_shot_holds_every_label_the_client_trains_on():
  # 10% anomalous: 5 random draws from a client's training split often
  # miss its few anomalies; the stratified draw never does.
  examples = [data.Example('x', ('no', 'yes'), int(i % 10 == 0), 's')
              for i in range(200)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  labels = task.labels()
  missed = 0
  for seed in range(10):
    plain = data.partition(task, 5, logs_cfg(), seed)
    strat = data.partition(task, 5, logs_cfg(stratify=True), seed)
    for i in range(5):
      few = strat.few_shot[i]
      assert len(few) == min(5, len(strat.train[i])) == len(set(few))
      assert set(few) <= set(strat.train[i])
      assert set(labels[few]) == set(labels[strat.train[i]])
      missed += int(set(labels[plain.few_shot[i]]) !=
                    set(labels[plain.train[i]]))
  assert missed > 0  # the random draw does miss a label


def test_few_shot_draw_rarest_label_first_and_k_caps_it():
  labels = np.array([0] * 8 + [1] * 3 + [2])
  train = np.arange(12)
  rng = np.random.default_rng(0)
  one = few_shot_draw(train, 1, rng, labels)
  assert labels[one].tolist() == [2]
  two = few_shot_draw(train, 2, rng, labels)
  assert sorted(labels[two].tolist()) == [1, 2]
  assert len(few_shot_draw(train, 50, rng, labels)) == 12
  assert len(few_shot_draw(train, 3, rng, None)) == 3


# ---- Tokenization -----------------------------------------------------------


def test_loss_mask_is_answer_plus_eos(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  part = data.partition(task, 3, cfg, 0)
  arrays = data.encode_clients(tok, task, part.train, cfg)
  assert arrays.tokens.shape[-1] in (64, 128, 256)
  assert arrays.truncated == 0
  for c in range(3):
    assert arrays.counts[c] == len(part.train[c])
    for row in (0, arrays.counts[c] - 1):
      e = task.examples[part.train[c][row]]
      masked = arrays.tokens[c, row][arrays.loss_mask[c, row] > 0]
      assert tok.decode(masked) == ' ' + e.answer + '</s>'
      n = arrays.lengths[c, row]
      assert arrays.attention_mask[c, row].sum() == n
      assert masked[-1] == tok.eos_token_id == arrays.tokens[c, row, n - 1]
      prompt = data.build_prompt(e, cfg.template, cfg)
      assert tok.decode(arrays.tokens[c, row, :n],
                        skip_special_tokens=True) == f'{prompt} {e.answer}'
    # Padded rows are all pad and masked out.
    assert np.all(arrays.tokens[c, arrays.counts[c]:] == tok.pad_token_id)
    assert arrays.loss_mask[c, arrays.counts[c]:].sum() == 0


def test_options_share_prompt_with_training(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  idx = [np.arange(5), np.arange(5, 7)]
  opts = data.encode_options(tok, task, idx, cfg)
  sft = data.encode_clients(tok, task, idx, cfg)
  assert opts.tokens.shape[:3] == (2, 5, 2)
  assert opts.valid.tolist() == [[True] * 5, [True] * 2 + [False] * 3]
  for c, row in ((0, 0), (1, 1)):
    for o, name in enumerate(task.options):
      toks = opts.tokens[c, row, o][opts.option_mask[c, row, o] > 0]
      assert tok.decode(toks) == ' ' + name
    label = opts.labels[c, row]
    n = int(opts.attention_mask[c, row, label].sum())
    # Scoring sequence for the right option == SFT sequence without the eos.
    assert np.array_equal(opts.tokens[c, row, label, :n],
                          sft.tokens[c, row, :sft.lengths[c, row] - 1])


def test_truncation_drops_lines_from_the_end(tok):
  cfg = logs_cfg(max_length=128, length_buckets=(64, 128))
  lines = tuple(f'line number {i} of the window' for i in range(40))
  example = data.Example('\n'.join(lines), ('no', 'yes'), 1, 'BGL', lines)
  task = data.Task('loghub', [example], ('no', 'yes'), 'f1', 'test', False)
  arrays = data.encode_clients(tok, task, [np.array([0])], cfg)
  assert arrays.truncated == 1 and arrays.lengths[0, 0] <= 128
  text = tok.decode(arrays.tokens[0, 0, :arrays.lengths[0, 0]],
                    skip_special_tokens=True)
  assert text.startswith('Below is a system log question')
  assert 'line number 0 of' in text and 'line number 39' not in text
  assert text.endswith('line number '
                       f'{text.count("line number") - 1} of the window\n\n'
                       '### Response: yes')


def test_a_line_too_long_for_the_budget_keeps_its_first_words(tok):
  # A one-line window (data.window_size=1) whose line alone is too long
  # keeps the line's first words; it never becomes an empty window with a
  # label.
  cfg = logs_cfg(max_length=128, length_buckets=(128,))
  line = ' '.join(f'word{i}' for i in range(60))
  long = data.Example(line, ('no', 'yes'), 1, 'BGL', (line,))
  short = data.Example('fits', ('no', 'yes'), 0, 'BGL', ('fits',))
  task = data.Task('loghub', [long, short], ('no', 'yes'), 'f1', 'test',
                   False)
  arrays = data.encode_clients(tok, task, [np.array([0, 1])], cfg)
  assert arrays.truncated == 1 and arrays.lengths[0, 0] <= 128
  text = tok.decode(arrays.tokens[0, 0, :arrays.lengths[0, 0]],
                    skip_special_tokens=True)
  kept = text.split('yes or no.\n', 1)[1].split('\n\n### Response')[0]
  assert kept.startswith('word0 word1') and 'word59' not in kept
  assert line.startswith(kept)
  # Without the fix the window kept 0 lines: an empty log.
  assert len(kept.split()) >= 2


def test_sample_steps_shapes_order_and_empty_clients(tok):
  cfg = logs_cfg()
  task = data.load_task(cfg, 0)
  idx = [np.arange(7), np.arange(7, 10), np.zeros(0, np.int64)]
  arrays = data.encode_clients(tok, task, idx, cfg)
  full = data.sample_steps(arrays, 0, 6, 2, seed=3, buckets=(64, 128, 256))
  part = data.sample_steps(arrays, 4, 2, 2, seed=3, buckets=(64, 128, 256))
  length = full['tokens'].shape[-1]
  assert full['tokens'].shape == (6, 3, 2, length)
  assert full['valid'].shape == (6, 3, 2)
  assert full['valid'][:, 2].sum() == 0 and full['valid'][:, :2].min() == 1
  np.testing.assert_array_equal(
      part['tokens'], full['tokens'][4:, ..., :part['tokens'].shape[-1]])
  # Client 1 (3 examples): each epoch of 3 draws is a permutation.
  rows = tokenize.example_order(3, 1, 3, 0, 6, 2).reshape(-1)
  for e in range(4):
    assert sorted(rows[3 * e:3 * e + 3]) == [0, 1, 2]
  # Trimmed to the smallest bucket holding the longest drawn example.
  longest = int((full['attention_mask'].sum(-1)).max())
  assert length == min(b for b in (64, 128, 256) if b >= longest)


# ---- TFDS -------------------------------------------------------------------


def test_tfds_build_and_data_source(tmp_path):
  tfds_data = pytest.importorskip('fdlora_jax.data.tfds_data')
  (tmp_path / 'logs').mkdir()
  synthetic.write_synthetic_log(tmp_path / 'logs' / 'BGL_small.log', 'BGL',
                                200, seed=0, block=20)
  cfg = logs_cfg(dir=str(tmp_path / 'logs'), window_size=20,
                 window_stride=20, tfds_dir=str(tmp_path / 'tfds'))
  plain = data.load_task(cfg, 0)
  cfg.use_tfds = True
  via_tfds = data.load_task(cfg, 0)
  assert via_tfds.examples == plain.examples  # same order, same content
  assert via_tfds.skipped_by_file == plain.skipped_by_file == {
      str((tmp_path / 'logs' / 'BGL_small.log').resolve()): 0}
  assert len(via_tfds.examples) == 10
  assert 'TFDS array_record' in via_tfds.data_source
  built = list((tmp_path / 'tfds').rglob('*.array_record*'))
  assert built
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_data.builder_for(cfg)
  source = tfds.data_source(builder.name, split='train',
                            data_dir=str(tmp_path / 'tfds'),
                            builder_kwargs={'config': builder.builder_config,
                                            'file_format': 'array_record'})
  assert len(source) == 10
  assert source[3]['text'].decode() == plain.examples[3].text
  assert 'tensorflow' not in sys.modules  # built and read without TF


@needs_shared
def test_tfds_medical_task_reads_the_same_examples(tmp_path):
  """A medical task through TFDS: the file found as without TFDS
  (medical.task_path), the same examples back, and a missing file still
  named before anything is built."""
  pytest.importorskip('fdlora_jax.data.tfds_data')
  cfg = medical_cfg('pubmedqa', tfds_dir=str(tmp_path / 'tfds'))
  plain = data.load_task(cfg, 0)
  cfg.use_tfds = True
  via_tfds = data.load_task(cfg, 0)
  assert via_tfds.examples == plain.examples and len(plain.examples) > 0
  assert via_tfds.options == plain.options
  assert 'TFDS array_record' in via_tfds.data_source
  cfg.files = 'nothing.json'
  with pytest.raises(FileNotFoundError, match='nothing.json'):
    data.load_task(cfg, 0)
  assert not list((tmp_path / 'tfds').rglob('*nothing*'))
