"""TFDS builders for the log and medical tasks (array_record, no TensorFlow).

Selected by `c.data.use_tfds`. The same readers as the plain path
(`logs.py`, `medical.py`) generate the examples; TFDS writes them to
array_record files under `c.data.tfds_dir`, and `tfds.data_source` reads them
back with random access. tensorflow-datasets 4.9.10 builds and reads
array_record without TensorFlow installed (checked: `tensorflow` is never
imported). Raw logs are streamed into the writer (TFDS buffers the
serialized examples in memory up to 1 GB, then spills to temporary files).

A builder config names the window size and stride, and a fingerprint of the
input files (paths, sizes, modification times), so other files or windows
build a new dataset and an unchanged one is reused.
"""

import dataclasses
import hashlib
import pathlib

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from fdlora_jax.data import logs
from fdlora_jax.data import medical
from fdlora_jax.data.examples import Example
from fdlora_jax.errors import ConfigError

_TEXT = tfds.features.Text
# tensorflow-datasets 4.9.10 computes a builder's `code_path` with
# `importlib_resources`, which it only installs for Python < 3.9; a builder
# inside a package then fails with ModuleNotFoundError. Setting the path
# ourselves avoids that (and the extra package).
_CODE_PATH = epath.Path(__file__)


@dataclasses.dataclass
class LogConfig(tfds.core.BuilderConfig):
  """Windows of `window_size` lines every `window_stride` lines of `files`.

  Empty `files`: every LogHub file found in the manual dir.
  """
  window_size: int = 50
  window_stride: int = 50
  files: tuple[str, ...] = ()


class FdloraLoghub(tfds.core.GeneratorBasedBuilder):
  """LogHub log windows (BGL, Thunderbird, Spirit) labelled anomalous or not."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = _CODE_PATH
  RELEASE_NOTES = {'1.0.0': 'Windows of LogHub messages, headers dropped.'}
  BUILDER_CONFIGS = [LogConfig(name='w50_s50')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place the raw LogHub logs (BGL*.log, Thunderbird*.log, Spirit*.log; '
      'from ' + logs.LOGHUB_SOURCE + ') and/or pre-windowed Spirit/*.json in '
      'the manual directory (c.data.dir).')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Windows of consecutive log messages; label yes if any '
                    'line of the window is an alert.',
        features=tfds.features.FeaturesDict({
            'text': _TEXT(),  # the window's messages joined by '\n'
            'label': tfds.features.ClassLabel(names=list(logs.OPTIONS)),
            'source': _TEXT(),
        }),
        disable_shuffling=True,  # keep file and time order
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/logpai/loghub',
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.files:
      files = [pathlib.Path(f) for f in cfg.files]
    else:
      files = logs.find_log_files(ml_collections.ConfigDict(
          {'dir': str(dl_manager.manual_dir), 'files': ''}))
    return {'train': self._generate_examples(files)}

  def _generate_examples(self, files):
    cfg, key, described, skipped = self.builder_config, 0, [], {}
    for path in files:
      stats = logs.ParseStats(str(path.resolve()))
      n = 0
      for e in logs.file_examples(path, cfg.window_size, cfg.window_stride,
                                  stats):
        yield key, {'text': e.text, 'label': e.label, 'source': e.source}
        key += 1
        n += 1
      logs.check_stats(stats, n, cfg.window_size)
      skipped[stats.path] = skipped.get(stats.path, 0) + stats.skipped
      described.append(f'{path.resolve()} ({n} windows)')
    self.info.metadata['skipped_lines'] = sum(skipped.values())
    self.info.metadata['skipped_by_file'] = skipped
    self.info.metadata['files'] = described


@dataclasses.dataclass
class MedicalConfig(tfds.core.BuilderConfig):
  """One medical task read from `file` (or found in the manual dir)."""
  task: str = 'pubmedqa'
  file: str = ''


class FdloraMedical(tfds.core.GeneratorBasedBuilder):
  """AdaptLLM medicine tasks: prompt text, answer options, correct index."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = _CODE_PATH
  RELEASE_NOTES = {'1.0.0': 'PubMedQA, ChemProt, RCT, MQP, USMLE readers.'}
  BUILDER_CONFIGS = [MedicalConfig(name=t, task=t) for t in medical.READERS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place the task file in the manual directory: ' + '; '.join(
          f'{t}: {" or ".join(medical.PATTERNS[t])} from {medical.SOURCES[t]}'
          for t in medical.READERS))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='A medical question with its answer options.',
        features=tfds.features.FeaturesDict({
            'text': _TEXT(),
            'label': np.int64,
            'source': _TEXT(),
            'options': tfds.features.Sequence(_TEXT()),
            'option_texts': tfds.features.Sequence(_TEXT()),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage='https://huggingface.co/datasets/AdaptLLM/medicine-tasks',
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    path = pathlib.Path(cfg.file) if cfg.file else medical.find_file(
        cfg.task, pathlib.Path(dl_manager.manual_dir))
    return {'train': self._generate_examples(path)}

  def _generate_examples(self, path):
    examples, _, skipped = medical.READERS[self.builder_config.task](path)
    for key, e in enumerate(examples):
      yield key, {'text': e.text, 'label': e.label, 'source': e.source,
                  'options': list(e.options),
                  'option_texts': list(e.option_texts)}
    self.info.metadata['skipped_lines'] = sum(skipped.values())
    self.info.metadata['skipped_by_file'] = skipped
    self.info.metadata['files'] = [str(path.resolve())]


def fingerprint(files: list[pathlib.Path]) -> str:
  """A short hash of file paths, sizes and modification times."""
  h = hashlib.sha256()
  for f in files:
    st = f.stat()
    h.update(f'{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
  return h.hexdigest()[:10]


def builder_for(data_cfg: ml_collections.ConfigDict
                ) -> tfds.core.GeneratorBasedBuilder:
  """The (not yet built) TFDS builder for `data_cfg`'s files."""
  data_dir = str(pathlib.Path(data_cfg.tfds_dir).expanduser())
  if data_cfg.task == 'loghub':
    logs.check_windows(data_cfg)
    files = logs.selected_files(data_cfg)
    cfg = LogConfig(
        name=(f'w{data_cfg.window_size}_s{data_cfg.window_stride}_'
              f'{fingerprint(files)}'),
        window_size=data_cfg.window_size,
        window_stride=data_cfg.window_stride,
        files=tuple(str(f.resolve()) for f in files))
    return FdloraLoghub(config=cfg, data_dir=data_dir,
                        file_format='array_record')
  path = medical.task_path(data_cfg)
  cfg = MedicalConfig(name=f'{data_cfg.task}_{fingerprint([path])}',
                      task=data_cfg.task, file=str(path.resolve()))
  return FdloraMedical(config=cfg, data_dir=data_dir,
                       file_format='array_record')


def build(data_cfg: ml_collections.ConfigDict
          ) -> tfds.core.GeneratorBasedBuilder:
  """Builds (once) the array_record dataset for `data_cfg`; returns it."""
  if not data_cfg.dir and not data_cfg.files:
    raise ConfigError('config.data.use_tfds=True: needs real files; set '
                      'config.data.dir (the synthetic logs are generated in '
                      'memory, not via TFDS)')
  builder = builder_for(data_cfg)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(pathlib.Path(data_cfg.dir or '.').expanduser())))
  return builder


def _str(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def read_examples(data_cfg: ml_collections.ConfigDict, seed: int
                  ) -> tuple[list[Example], tuple[str, ...], str, bool,
                             dict[str, int]]:
  """Like tasks.read_examples, through a TFDS build + tfds.data_source.

  The per-file skipped counts are those recorded in the dataset's metadata
  when it was built (the files are not read again when it is reused).
  """
  del seed  # real data only
  builder = build(data_cfg)
  source = tfds.data_source(
      builder.name, split='train',
      data_dir=str(pathlib.Path(data_cfg.tfds_dir).expanduser()),
      builder_kwargs={'config': builder.builder_config,
                      'file_format': 'array_record'})
  records = source.__getitems__(list(range(len(source))))
  examples = []
  for r in records:
    text, src = _str(r['text']), _str(r['source'])
    if data_cfg.task == 'loghub':
      examples.append(Example(text, logs.OPTIONS, int(r['label']), src,
                              lines=tuple(text.split('\n'))))
    else:
      examples.append(Example(
          text, tuple(_str(o) for o in r['options']), int(r['label']), src,
          option_texts=tuple(_str(o) for o in r['option_texts'])))
  options = logs.OPTIONS if data_cfg.task == 'loghub' else examples[0].options
  meta = builder.info.metadata or {}
  description = (f'real: {"; ".join(meta.get("files", []))} via TFDS '
                 f'array_record {builder.data_dir}')
  skipped = {str(k): int(v) for k, v in
             dict(meta.get('skipped_by_file', {})).items()}
  return examples, options, description, False, skipped
