"""mesp: exact-gradient LoRA fine-tuning under tight memory (Memory-efficient Structured Backpropagation)."""

from .errors import MespError
from .model import Model, ModelConfig, forward

__version__ = "0.1.0"
