"""Data: LogHub windows and medical tasks, federated partitions, batches."""

from fdlora_jax.data.examples import Example
from fdlora_jax.data.examples import Task
from fdlora_jax.data.examples import build_prompt
from fdlora_jax.data.partition import Partition
from fdlora_jax.data.partition import SPLITS
from fdlora_jax.data.partition import partition
from fdlora_jax.data.partition import write_partition
from fdlora_jax.data.tasks import class_counts
from fdlora_jax.data.tasks import label_counts
from fdlora_jax.data.tasks import load_task
from fdlora_jax.data.tokenize import ClientArrays
from fdlora_jax.data.tokenize import OptionArrays
from fdlora_jax.data.tokenize import answer_prefix
from fdlora_jax.data.tokenize import plain_answer_prefix
from fdlora_jax.data.tokenize import demonstrations
from fdlora_jax.data.tokenize import encode_clients
from fdlora_jax.data.tokenize import encode_options
from fdlora_jax.data.tokenize import option_ids
from fdlora_jax.data.tokenize import sample_steps
from fdlora_jax.data.tokenize import tokenizer_texts
