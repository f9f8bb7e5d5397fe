"""The two data types every task reduces to, and prompt building."""

import dataclasses
import re

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  """One question with its answer options.

  Attributes:
    text: the question body without the template: log window lines joined by
      '\\n', or question + context for the medical tasks.
    options: the answer strings, e.g. ('no', 'yes') or ChemProt label names.
    label: index into `options` of the correct answer.
    source: where it came from: 'BGL', 'Thunderbird', 'Spirit', 'pubmedqa',
      'chemprot', 'synthetic:BGL', ...
    lines: for log windows, the messages, so truncation can drop whole lines.
    option_texts: display text per option when the option itself is a letter
      (USMLE: options ('A', ...), option_texts ('Aspirin', ...)).
  """
  text: str
  options: tuple[str, ...]
  label: int
  source: str
  lines: tuple[str, ...] = ()
  option_texts: tuple[str, ...] = ()

  @property
  def answer(self) -> str:
    return self.options[self.label]


@dataclasses.dataclass
class Task:
  """A labelled dataset plus what is needed to evaluate it.

  Attributes:
    name: 'loghub' | 'pubmedqa' | 'chemprot' | 'rct' | 'mqp' | 'usmle'.
    examples: all examples, in file order.
    options: class names shared by all examples.
    metric: 'f1' (binary, positive class options.index('yes')) | 'accuracy'
      | 'micro_f1'.
    data_source: where the data came from, e.g.
      'real: /abs/BGL_2k.log (LogHub)' or 'synthetic: fdlora_jax built-in ...'.
    is_synthetic: True for the built-in generator; never presented as real.
    skipped_lines: malformed lines or records skipped while reading (the
      total of `skipped_by_file`).
    skipped_by_file: absolute path -> malformed lines or records skipped in
      it, for every file read (0 included); empty for synthetic data.
  """
  name: str
  examples: list[Example]
  options: tuple[str, ...]
  metric: str
  data_source: str
  is_synthetic: bool
  skipped_lines: int = 0
  skipped_by_file: dict[str, int] = dataclasses.field(default_factory=dict)

  def labels(self) -> np.ndarray:
    """int32 [len(examples)] label per example."""
    return np.asarray([e.label for e in self.examples], np.int32)


def with_text(example: Example, text: str,
              lines: tuple[str, ...] | None = None) -> Example:
  """A copy of `example` with a shorter body (used by truncation)."""
  return dataclasses.replace(
      example, text=text, lines=example.lines if lines is None else lines)


def options_block(example: Example) -> str:
  """'- yes\\n- no' or, with option texts, 'A. Aspirin\\nB. ...'."""
  if example.option_texts:
    return '\n'.join(f'{o}. {t}' for o, t in
                     zip(example.options, example.option_texts))
  return '\n'.join(f'- {o}' for o in example.options)


def build_prompt(example: Example, template: str,
                 data_cfg: ml_collections.ConfigDict) -> str:
  """Fills `template` ('{input}', '{options}') for one example.

  The input is `data_cfg.questions[data_cfg.task]` (if non-empty), a newline,
  and the example's text. Placeholders are substituted in one pass (no
  str.format), so braces in log lines or option texts are kept as they are.

  Args:
    example: the example.
    template: e.g. c.data.template.
    data_cfg: the `c.data` block (uses `task` and `questions`).

  Returns:
    The prompt, ending with the response marker (no trailing space).
  """
  options = options_block(example)
  question = _fill(data_cfg.questions.get(data_cfg.task, '') or '',
                   {'options': options})
  body = f'{question}\n{example.text}' if question else example.text
  return _fill(template, {'input': body, 'options': options})


def _fill(template: str, values: dict[str, str]) -> str:
  return re.sub(r'\{(input|options)\}',
                lambda m: values.get(m.group(1), m.group(0)), template)
