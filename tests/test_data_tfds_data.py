"""TFDS builders (fdlora_jax/data/tfds_data.py).

On the real samples in ../shared/data (see its README.md)."""

import sys

import pytest

from fdlora_jax import data
from fdlora_jax.data import synthetic
from tests.helpers import logs_cfg, medical_cfg, needs_shared


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
