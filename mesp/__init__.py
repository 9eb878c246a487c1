"""mesp: exact-gradient LoRA fine-tuning under tight memory (Memory-efficient Structured Backpropagation)."""

from .errors import MespError
from .families import ModelConfig
from .generate import generate, generate_stream
from .loaders import PRESETS, list_presets, load_model, load_tokenizer
from .lora import LoraConfig, add_lora, load_adapter, save_adapter
from .methods import compute_gradients
from .model import Model, forward
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"
