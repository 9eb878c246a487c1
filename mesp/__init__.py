"""mesp: exact-gradient LoRA fine-tuning under tight memory (Memory-efficient Structured Backpropagation)."""

from .errors import MespError
from .lora import LoraConfig, add_lora, load_adapter, save_adapter
from .methods import compute_gradients
from .model import Model, ModelConfig, forward

__version__ = "0.1.0"
