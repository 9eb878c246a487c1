"""torchtune's LoRA single-device recipe (recipes/lora_finetune_single_device.py), its training step on the CPU:
the recipe's model builder (lora_qwen2 on q, k, v, output_proj and the MLP, as the qwen2_5 LoRA configs), the
HF checkpoint converted by the recipe's checkpointer function (qwen2_hf_to_tune), the shared initial adapter copied
into lora_a / lora_b, only the adapter trainable (set_trainable_params), CEWithChunkedOutputLoss with the model's
chunked output, labels shifted by appending ignore_index, the loss scaled by the token count and the gradients by
its inverse (scale_grads), torch.optim SGD or AdamW. spec["activation_checkpointing"]: the recipe's
enable_activation_checkpointing. The recipe itself (`tune run`) cannot be run on this work: it needs a tokenizer
and a dataset, and the shared model is random weights with pre-tokenized samples."""

import json
from pathlib import Path

import peer_step_loop

spec = peer_step_loop.read_spec()

import torch  # noqa: E402
import torchtune  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torchtune import modules, training  # noqa: E402
from torchtune.models.qwen2._component_builders import lora_qwen2  # noqa: E402
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune  # noqa: E402
from torchtune.modules.loss import CEWithChunkedOutputLoss  # noqa: E402
from torchtune.modules.peft import get_adapter_params, set_trainable_params  # noqa: E402

torch.set_num_threads(spec["threads"])
hf = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
if hf["model_type"] != "qwen2":
    raise SystemExit(f"torchtune worker: model_type {hf['model_type']!r}; this worker builds qwen2 only")
rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 1_000_000.0))
dims = dict(num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"], dim=hf["hidden_size"],
            tie_word_embeddings=hf.get("tie_word_embeddings", False))
model = lora_qwen2(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=False,
                   vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], num_heads=dims["num_heads"],
                   num_kv_heads=dims["num_kv_heads"], embed_dim=dims["dim"], intermediate_dim=hf["intermediate_size"],
                   max_seq_len=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"], rope_base=rope,
                   tie_word_embeddings=dims["tie_word_embeddings"], lora_rank=spec["rank"],
                   lora_alpha=spec["alpha"], lora_dropout=0.0)
set_trainable_params(model, get_adapter_params(model))
if spec.get("activation_checkpointing"):
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
state = qwen2_hf_to_tune(load_file(str(Path(spec["model_dir"]) / "model.safetensors")), **dims)
TUNE_NAMES = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
              "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
              "mlp.up_proj": "mlp.w3"}
for key, value in load_file(str(Path(spec["adapter"]) / "adapter_model.safetensors")).items():
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> layers.0.attn.q_proj.lora_a.weight
    _, i, rest = key.removeprefix("base_model.model.model.").split(".", 2)
    proj, ab, _ = rest.rsplit(".", 2)
    state[f"layers.{i}.{TUNE_NAMES[proj]}.{'lora_a' if ab == 'lora_A' else 'lora_b'}.weight"] = value
missing, unexpected = model.load_state_dict(state, strict=False)
if missing or unexpected:
    raise SystemExit(f"torchtune worker: missing {missing[:3]}, unexpected {unexpected[:3]}")
model.to(torch.float32).train()
loss_fn = CEWithChunkedOutputLoss()
model.set_num_output_chunks(loss_fn.num_output_chunks)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = (torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0) if spec["optimizer"] == "adamw"
             else torch.optim.SGD(params, lr=spec["lr"]))
ignore = torch.full((1, 1), loss_fn.ignore_index)


def step(ids):
    tokens = torch.tensor([ids])
    num_tokens = (tokens != loss_fn.ignore_index).sum()
    logits = model(tokens)
    labels = torch.hstack((tokens[..., 1:], ignore))
    loss = loss_fn(logits, labels)
    del logits
    (loss * num_tokens).backward()
    training.scale_grads(model, 1 / num_tokens)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


tool = "torchtune" + ("(ac)" if spec.get("activation_checkpointing") else "")
peer_step_loop.run_steps(spec, step, tool, f"torchtune {torchtune.__version__}")
