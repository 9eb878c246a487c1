"""mesp: exact-gradient LoRA fine-tuning under tight memory (Memory-efficient Structured Backpropagation)."""

from .hugepages import enable_torch_hugepages

enable_torch_hugepages()  # before the first import of torch (mesp/hugepages.py says why)

from .errors import MespError  # noqa: E402
from .export import export_gguf_lora, merge_gguf
from .families import ModelConfig
from .generate import generate, generate_stream
from .loaders import load_model
from .lora import LoraConfig, add_lora, load_adapter, save_adapter
from .methods import compute_gradients
from .model import Model, forward
from .presets import PRESETS, list_presets
from .quantize import quantize_model
from .tokenizer import load_tokenizer
from .train import TrainResult, train
from .train_config import TrainConfig

__version__ = "0.1.0"
