"""Medical tasks (Scenario 2, AdaptLLM medicine-tasks): readers per format.

Each reader returns (examples, options, skipped_by_file): records that do
not parse are skipped and counted per file read (absolute path -> count, 0
included). An empty or unreadable file, or one with no valid record, is a
DataError naming the file.

Formats:
  pubmedqa  JSON {pmid: {QUESTION, CONTEXTS, final_decision}} (PQA-L); a
            missing final_decision is looked up in a `*ground_truth*.json`
            beside it ({pmid: yes/no/maybe}).
  chemprot  JSON lines {text, label}, entities marked `<< chemical >>` and
            `[[ gene ]]` (scibert). Options: the labels found, sorted.
  rct       PubMed 200k/20k RCT txt: `###<id>` lines, `LABEL\\tsentence`
            lines, blank lines between abstracts.
  mqp       Medical Question Pairs, CSV with a header or JSON lines, fields
            question_1, question_2, label (1/0 or similar/dissimilar).
  usmle     MedQA JSON lines {question, options: {A: ..}, answer_idx}
            (jind11/MedQA), or {problem_text, choices: [..], answer: ['b']}
            (medLLM_QA_benchmark's MedQA-4op; choices lettered A, B, ..).
"""

import csv
import json
import pathlib

from fdlora_jax.data.examples import Example
from fdlora_jax.errors import DataError
from fdlora_jax.errors import MissingFileError

# Where each dataset comes from (named in errors) and the file names looked
# for in c.data.dir.
SOURCES = {
    'pubmedqa': ('PubMedQA PQA-L, https://github.com/pubmedqa/pubmedqa (Jin et '
                 'al., EMNLP 2019); AdaptLLM medicine-tasks, '
                 'https://huggingface.co/datasets/AdaptLLM/medicine-tasks'),
    'chemprot': ('ChemProt (Kringelum et al., 2016) as distributed by scibert, '
                 'https://github.com/allenai/scibert '
                 '(data/text_classification/chemprot)'),
    'rct': ('PubMed 200k RCT, https://github.com/Franck-Dernoncourt/pubmed-rct '
            '(Dernoncourt and Lee, IJCNLP 2017)'),
    'mqp': ('Medical Question Pairs, '
            'https://github.com/curai/medical-question-pair-dataset '
            '(McCreery et al., 2020)'),
    'usmle': ('MedQA-USMLE, https://github.com/jind11/MedQA (Jin et al., '
              '2021)'),
}
PATTERNS = {
    'pubmedqa': ('pubmedqa*.json', 'ori_pqal.json', 'test_set.json'),
    'chemprot': ('chemprot*.jsonl', 'chemprot*.txt'),
    'rct': ('rct*.txt', '*RCT*.txt', 'pubmed*rct*.txt'),
    'mqp': ('mqp*.csv', 'mqp*.jsonl', 'medical_question*pairs*.csv'),
    'usmle': ('usmle*.jsonl', 'medqa*.jsonl', 'US_qbank*.jsonl'),
}
RCT_OPTIONS = ('BACKGROUND', 'OBJECTIVE', 'METHODS', 'RESULTS', 'CONCLUSIONS')
MQP_OPTIONS = ('dissimilar', 'similar')
PUBMEDQA_OPTIONS = ('yes', 'no', 'maybe')
METRICS = {'pubmedqa': 'accuracy', 'chemprot': 'micro_f1', 'rct': 'micro_f1',
           'mqp': 'accuracy', 'usmle': 'accuracy'}

Read = tuple[list[Example], tuple[str, ...], dict[str, int]]


def find_file(task: str, root: pathlib.Path) -> pathlib.Path:
  """The data file for `task` in directory `root` (first pattern match)."""
  if not root.is_dir():
    raise MissingFileError(
        f'config.data.dir={str(root)!r}: {task} directory {root.resolve()} '
        f'does not exist; expected {" or ".join(PATTERNS[task])} from '
        f'{SOURCES[task]}')
  for pattern in PATTERNS[task]:
    found = [p for p in sorted(root.glob(pattern))
             if 'ground_truth' not in p.name and p.is_file()]
    if found:
      return found[0]
  raise MissingFileError(
      f'config.data.dir={str(root)!r}: no {task} file in {root.resolve()}; '
      f'expected {" or ".join(PATTERNS[task])} from {SOURCES[task]}')


def task_path(data_cfg) -> pathlib.Path:
  """The file of the medical task of ``data_cfg`` (the ``c.data`` block):
  ``data.files`` if set, else found in ``data.dir``."""
  task = data_cfg.task
  if not data_cfg.dir and not data_cfg.files:
    raise MissingFileError(
        f"config.data.dir='': the {task} task has no built-in data; set it to "
        f'a directory with {" or ".join(PATTERNS[task])} from '
        f'{SOURCES[task]}')
  root = pathlib.Path(data_cfg.dir or '.').expanduser()
  if data_cfg.files:
    path = pathlib.Path(data_cfg.files.split(',')[0].strip()).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
      raise MissingFileError(
          f'config.data.files={data_cfg.files!r}: {task} file '
          f'{path.resolve()} does not exist; it comes from '
          f'{SOURCES[task]}')
    return path
  return find_file(task, root)


def _key(path: pathlib.Path) -> str:
  return str(path.resolve())


def _text(path: pathlib.Path) -> str:
  data = path.read_bytes().decode('utf-8', errors='replace')
  if not data.strip():
    raise DataError(f'{path.resolve()}: file is empty')
  return data


def _json(path: pathlib.Path, expected: str):
  try:
    return json.loads(_text(path))
  except json.JSONDecodeError as e:
    raise DataError(f'{path.resolve()}: not valid JSON ({e}); expected '
                    f'{expected}') from e


def _json_lines(path: pathlib.Path) -> tuple[list[dict], int]:
  records, skipped = [], 0
  for line in _text(path).splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      skipped += 1
      continue
    if isinstance(record, dict):
      records.append(record)
    else:
      skipped += 1
  return records, skipped


def _check(path: pathlib.Path, task: str, examples: list[Example],
           skipped: int) -> None:
  if not examples:
    raise DataError(f'{path.resolve()}: no valid {task} records ({skipped} '
                    f'skipped); expected the format of {SOURCES[task]}')


def read_pubmedqa(path: pathlib.Path) -> Read:
  """PubMedQA: 'Question: ...\\nContext: ...', options yes/no/maybe.

  Entries of a ground-truth file that are not yes/no/maybe are skipped and
  counted against that file.
  """
  data = _json(path, '{pmid: {QUESTION, CONTEXTS, final_decision}}')
  if not isinstance(data, dict):
    raise DataError(f'{path.resolve()}: expected a JSON object '
                    f'{{pmid: record}}, got {type(data).__name__}')
  skipped = {_key(path): 0}
  truth = {}
  for p in sorted(path.parent.glob('*ground_truth*.json')):
    answers = _json(p, '{pmid: yes/no/maybe}')
    if not isinstance(answers, dict):
      raise DataError(f'{p.resolve()}: expected a JSON object '
                      f'{{pmid: yes/no/maybe}}, got {type(answers).__name__}')
    skipped[_key(p)] = 0
    for pmid, answer in answers.items():
      if isinstance(answer, str) and answer.strip().lower() in (
          PUBMEDQA_OPTIONS):
        truth[pmid] = answer
      else:
        skipped[_key(p)] += 1
  examples = []
  for pmid, r in data.items():
    try:
      decision = (r.get('final_decision') or truth[pmid]).strip().lower()
      text = (f'Question: {r["QUESTION"].strip()}\n'
              f'Context: {" ".join(c.strip() for c in r["CONTEXTS"])}')
    except (KeyError, AttributeError, TypeError):
      skipped[_key(path)] += 1
      continue
    if decision not in PUBMEDQA_OPTIONS:
      skipped[_key(path)] += 1
      continue
    examples.append(Example(text, PUBMEDQA_OPTIONS,
                            PUBMEDQA_OPTIONS.index(decision), 'pubmedqa'))
  _check(path, 'pubmedqa', examples, skipped[_key(path)])
  return examples, PUBMEDQA_OPTIONS, skipped


def read_chemprot(path: pathlib.Path) -> Read:
  """ChemProt: the sentence; options are the labels found (sorted)."""
  records, skipped = _json_lines(path)
  pairs = []
  for r in records:
    if isinstance(r.get('text'), str) and isinstance(r.get('label'), str):
      pairs.append((r['text'].strip(), r['label'].strip()))
    else:
      skipped += 1
  options = tuple(sorted({label for _, label in pairs}))
  examples = [Example(t, options, options.index(l), 'chemprot')
              for t, l in pairs]
  _check(path, 'chemprot', examples, skipped)
  return examples, options, {_key(path): skipped}


def read_rct(path: pathlib.Path) -> Read:
  """PubMed RCT: one example per `LABEL\\tsentence` line."""
  examples, skipped = [], 0
  for line in _text(path).splitlines():
    if not line.strip() or line.startswith('###'):
      continue
    label, _, sentence = line.partition('\t')
    if label.strip() not in RCT_OPTIONS or not sentence.strip():
      skipped += 1
      continue
    examples.append(Example(sentence.strip(), RCT_OPTIONS,
                            RCT_OPTIONS.index(label.strip()), 'rct'))
  _check(path, 'rct', examples, skipped)
  return examples, RCT_OPTIONS, {_key(path): skipped}


def _mqp_label(value) -> int | None:
  value = str(value).strip().lower()
  if value in ('1', 'similar', 'true', 'yes'):
    return 1
  if value in ('0', 'dissimilar', 'false', 'no'):
    return 0
  return None


def read_mqp(path: pathlib.Path) -> Read:
  """Medical Question Pairs: 'Question 1: ..\\nQuestion 2: ..'."""
  if path.suffix == '.jsonl':
    records, skipped = _json_lines(path)
  else:
    try:
      records = list(csv.DictReader(_text(path).splitlines()))
    except csv.Error as e:
      raise DataError(f'{path.resolve()}: not valid CSV ({e}); expected a '
                      'header with question_1,question_2,label') from e
    skipped = 0
  examples = []
  for r in records:
    q1, q2 = r.get('question_1'), r.get('question_2')
    label = _mqp_label(r.get('label'))
    if (not isinstance(q1, str) or not isinstance(q2, str) or not q1.strip()
        or not q2.strip() or label is None):
      skipped += 1
      continue
    examples.append(Example(f'Question 1: {q1.strip()}\n'
                            f'Question 2: {q2.strip()}', MQP_OPTIONS, label,
                            'mqp'))
  _check(path, 'mqp', examples, skipped)
  return examples, MQP_OPTIONS, {_key(path): skipped}


def _usmle_record(r: dict) -> dict:
  """A MedQA-4op record {problem_text, choices, answer: ['b']} in the
  jind11/MedQA form {question, options: {A: ..}, answer_idx: 'B'}; any other
  record unchanged (the checks below skip it if it is malformed)."""
  if not isinstance(r, dict) or 'problem_text' not in r:
    return r
  choices, answer = r.get('choices'), r.get('answer')
  if not isinstance(choices, list) or not (
      isinstance(answer, list) and len(answer) == 1
      and isinstance(answer[0], str)):
    return {}
  letters = [chr(ord('A') + i) for i in range(len(choices))]
  return {'question': r['problem_text'],
          'options': dict(zip(letters, choices)),
          'answer_idx': answer[0].strip().upper()}


def read_usmle(path: pathlib.Path) -> Read:
  """MedQA-USMLE: options are the letters of the first valid record."""
  records, skipped = _json_lines(path)
  examples, letters = [], None
  for r in records:
    r = _usmle_record(r)
    opts, answer = r.get('options'), r.get('answer_idx')
    if not isinstance(opts, dict) or not isinstance(r.get('question'), str):
      skipped += 1
      continue
    keys = tuple(sorted(opts))
    letters = letters or keys
    if keys != letters or answer not in letters:
      skipped += 1
      continue
    examples.append(Example(r['question'].strip(), letters,
                            letters.index(answer), 'usmle',
                            option_texts=tuple(str(opts[k]).strip()
                                               for k in letters)))
  _check(path, 'usmle', examples, skipped)
  return examples, letters, {_key(path): skipped}


READERS = {'pubmedqa': read_pubmedqa, 'chemprot': read_chemprot,
           'rct': read_rct, 'mqp': read_mqp, 'usmle': read_usmle}
