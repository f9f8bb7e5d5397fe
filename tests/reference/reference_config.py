"""The tiny FDLoRA config of the saved pre-refactor reference
(``fdlora_tiny.npz``). The field paths follow today's config layout; the
values are those the reference was produced with."""

from configs import tiny as tiny_base


def reference_config(tmp):
  c = tiny_base.get_config()
  c.model.name = ''
  c.data.synthetic_windows = 60
  c.data.min_examples_per_client = 3
  c.data.few_shot = 2
  c.fl.num_clients = 3
  c.fl.rounds = 3
  c.fl.inner_steps = 2
  c.fl.inner_lr = 1e-2
  c.fl.local_epochs = 0.5
  c.eval.every = 0
  c.fdlora.fusion.steps = 2
  c.fdlora.fusion.population_size = 4
  c.model.tokenizer_cache = str(tmp / 'tok')
  return c
