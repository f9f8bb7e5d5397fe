"""Medical tasks (fdlora_jax/data/medical.py): the readers per format on the
real samples, missing files and skipped records.

On the real samples in ../shared/data (see its README.md)."""

import json

import pytest

from fdlora_jax import data
from tests.helpers import (MEDICAL, SHARED_DATA, logs_cfg, medical_cfg,
                           needs_shared, write_file)


def test_missing_medical_file_names_source(tmp_path):
  with pytest.raises(FileNotFoundError, match='pubmedqa') as e:
    data.load_task(medical_cfg('pubmedqa', dir=str(tmp_path)), 0)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match='no built-in data'):
    data.load_task(medical_cfg('chemprot', dir=''), 0)


@needs_shared
def test_skipped_records_per_medical_file(tmp_path):
  records = json.loads((MEDICAL / 'pubmedqa_pqal_test500.json').read_text())
  pmids = list(records)
  del records[pmids[0]]['final_decision']  # looked up in the truth file
  del records[pmids[1]]['final_decision']  # not there either: skipped
  main = write_file(tmp_path / 'pubmedqa_x.json', json.dumps(records).encode())
  truth = {pmids[0]: 'yes', 'other': 'perhaps', 'more': 3}
  truth_file = write_file(tmp_path / 'x_ground_truth.json',
                      json.dumps(truth).encode())
  task = data.load_task(medical_cfg('pubmedqa', dir=str(tmp_path)), 0)
  assert len(task.examples) == 499
  assert task.skipped_by_file == {str(main.resolve()): 1,
                                  str(truth_file.resolve()): 2}
  assert task.skipped_lines == 3
  assert data.load_task(logs_cfg(), 0).skipped_by_file == {}  # synthetic


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


def test_usmle_reads_the_medqa_4op_form(tmp_path):
  rows = [{'problem_id': 0, 'problem_text': 'Best drug?',
           'choices': ['x', 'y', 'z', 'w'], 'answer': ['c']},
          {'problem_id': 1, 'problem_text': 'Two answers?',
           'choices': ['x', 'y', 'z', 'w'], 'answer': ['a', 'b']},
          {'problem_id': 2, 'problem_text': 'Second?',
           'choices': ['p', 'q', 'r', 's'], 'answer': ['a']}]
  (tmp_path / 'medqa_usmle_4op_test.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in rows) + '\n')
  task = data.load_task(medical_cfg('usmle', dir=str(tmp_path)), 0)
  assert task.options == ('A', 'B', 'C', 'D')
  assert [e.label for e in task.examples] == [2, 0]
  assert task.examples[0].option_texts == ('x', 'y', 'z', 'w')
  assert task.skipped_lines == 1


@needs_shared
def test_usmle_reads_the_whole_medqa_test_in_medical_full():
  task = data.load_task(
      medical_cfg('usmle', dir=str(SHARED_DATA / 'medical_full')), 0)
  assert len(task.examples) == 1273 and task.skipped_lines == 0
  assert task.options == ('A', 'B', 'C', 'D')
