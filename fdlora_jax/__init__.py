"""fdlora_jax: personalized federated fine-tuning of LLaMA with dual LoRA."""

__version__ = '0.1.0'
