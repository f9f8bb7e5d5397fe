"""`load_task`: from `c.data` to a Task, for both scenarios."""

from absl import logging
import ml_collections
import numpy as np

from fdlora_jax.data import logs
from fdlora_jax.data import medical
from fdlora_jax.data.examples import Example
from fdlora_jax.data.examples import Task
from fdlora_jax.errors import need

TASKS = ('loghub',) + tuple(medical.READERS)


def read_examples(data_cfg: ml_collections.ConfigDict, seed: int
                  ) -> tuple[list[Example], tuple[str, ...], str, bool,
                             dict[str, int]]:
  """(examples, options, data_source, is_synthetic, skipped_by_file).

  `skipped_by_file`: absolute path -> malformed lines/records skipped, for
  every file read (0 included); empty for the synthetic logs.
  """
  if data_cfg.task == 'loghub':
    if not data_cfg.dir and not data_cfg.files:
      examples, source = logs.load_synthetic(data_cfg, seed)
      return examples, logs.OPTIONS, source, True, {}
    examples, source, skipped = logs.load_real(data_cfg)
    return examples, logs.OPTIONS, source, False, skipped
  path = medical.task_path(data_cfg)
  examples, options, skipped = medical.READERS[data_cfg.task](path)
  source = f'real: {path.resolve()} ({medical.SOURCES[data_cfg.task]})'
  return examples, options, source, False, skipped


def load_task(data_cfg: ml_collections.ConfigDict, seed: int) -> Task:
  """Reads the task named by `data_cfg.task`.

  Logs: an empty `data_cfg.dir` (and no `files`) means the built-in synthetic
  logs; otherwise the real LogHub files. Medical tasks need real files. With
  `data_cfg.use_tfds`, the same files go through a TFDS array_record build
  and are read back with `tfds.data_source` (see `tfds_data.py`).
  `data_cfg.balance` keeps, per label, a seeded random subset as large as
  the rarest label's; then `data_cfg.max_examples` > 0 keeps a seeded random
  subset. Both keep file order.

  Args:
    data_cfg: the `c.data` block.
    seed: for the synthetic generator and the subsample.

  Returns:
    The Task; its `data_source` says where the data came from.
  """
  need(data_cfg.task in TASKS, 'data.task', data_cfg.task,
       f'unknown task; choose from {TASKS}')
  need(data_cfg.max_examples >= 0, 'data.max_examples', data_cfg.max_examples,
       'must be >= 0 (0: all examples)')
  if data_cfg.use_tfds:
    from fdlora_jax.data import tfds_data  # pylint: disable=g-import-not-at-top
    examples, options, source, synthetic, skipped = tfds_data.read_examples(
        data_cfg, seed)
  else:
    examples, options, source, synthetic, skipped = read_examples(
        data_cfg, seed)
  if data_cfg.balance:
    labels = np.asarray([e.label for e in examples])
    present = np.unique(labels)
    least = min(int((labels == k).sum()) for k in present)
    rng = np.random.default_rng([seed, 3])
    keep = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == k), least, replace=False)
        for k in present]))
    examples = [examples[i] for i in keep]
    source += (f' (balanced: {least} per label of {len(present)}, seed '
               f'{seed})')
  if data_cfg.max_examples and len(examples) > data_cfg.max_examples:
    keep = np.random.default_rng(seed).choice(
        len(examples), data_cfg.max_examples, replace=False)
    examples = [examples[i] for i in np.sort(keep)]
    source += f' (subsample of {data_cfg.max_examples}, seed {seed})'
  metric = 'f1' if data_cfg.task == 'loghub' else medical.METRICS[
      data_cfg.task]
  task = Task(name=data_cfg.task, examples=examples, options=options,
              metric=metric, data_source=source, is_synthetic=synthetic,
              skipped_lines=sum(skipped.values()),
              skipped_by_file=dict(skipped))
  logging.info('task %s: %d examples, %s; data source: %s', task.name,
               len(examples), class_counts(task), source)
  return task


def class_counts(task: Task) -> dict[str, int]:
  """{option: number of examples with that label}."""
  counts = np.bincount(task.labels(), minlength=len(task.options))
  return dict(zip(task.options, counts.tolist()))


def label_counts(task: Task, indices) -> np.ndarray:
  """``[N, O]`` examples per answer option in each client's ``indices``
  (e.g. ``Partition.train``)."""
  labels = task.labels()
  return np.stack([np.bincount(labels[np.asarray(ix, np.int64)],
                               minlength=len(task.options))
                   for ix in indices]).astype(np.int64)
