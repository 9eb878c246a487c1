"""mlx-lm's LoRA trainer on the CPU (mlx[cpu] on Linux), the framework of the MeSP paper's reference code:
mlx_lm.utils.load_model, mlx_lm.tuner.utils.linear_to_lora_layers on all seven projections of every layer, the
shared initial adapter copied in (mlx-lm keeps A and B transposed: lora_a = A.T, lora_b = B.T; scale = alpha / r,
where mlx-lm's own default would be 20 with its own init), the trainer's default_loss under nn.value_and_grad,
mlx.optimizers SGD or AdamW, and the trainer's grad_checkpoint with spec["grad_checkpoint"].
spec["bits"]: train on the 4-bit copy in spec["mlx_model_dir"] (what `mlx_lm convert -q` makes: affine,
group size 64). With spec["convert_to"], only write that copy and exit."""

from pathlib import Path

import peer_step_loop

spec = peer_step_loop.read_spec()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.tuner.trainer import default_loss, grad_checkpoint  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load_model, quantize_model, save_config, save_model  # noqa: E402

mx.set_default_device(mx.cpu)
GROUP_SIZE = 64
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
PEFT_PREFIX = "base_model.model."

if spec.get("convert_to"):  # mlx_lm convert -q, without the tokenizer a random-weight model lacks
    model, config = load_model(Path(spec["model_dir"]))
    model, config = quantize_model(model, config, GROUP_SIZE, spec["bits"])
    save_model(spec["convert_to"], model)
    save_config(config, Path(spec["convert_to"]) / "config.json")
    raise SystemExit(0)

model, config = load_model(Path(spec["mlx_model_dir"] if spec.get("bits") else spec["model_dir"]))
model.freeze()
linear_to_lora_layers(model, len(model.layers), {"rank": spec["rank"], "scale": spec["alpha"] / spec["rank"],
                                                 "dropout": 0.0, "keys": KEYS})
adapter = mx.load(str(Path(spec["adapter"]) / "adapter_model.safetensors"))
weights = []
for key, value in adapter.items():  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    name = key[len(PEFT_PREFIX):].replace(".weight", "")
    module, ab = name.rsplit(".", 1)
    weights.append((f"{module}.{'lora_a' if ab == 'lora_A' else 'lora_b'}", value.T.astype(mx.float32)))
model.load_weights(weights, strict=False)
if spec.get("grad_checkpoint"):
    grad_checkpoint(model.layers[0])
model.train()
optimizer = (optim.AdamW(learning_rate=spec["lr"], weight_decay=0.0) if spec["optimizer"] == "adamw"
             else optim.SGD(learning_rate=spec["lr"]))
loss_value_and_grad = nn.value_and_grad(model, default_loss)


def step(ids):
    batch = mx.array([ids])
    lengths = mx.array([[0, len(ids)]])  # every position is a target (offset 0, length T)
    (loss, _), grad = loss_value_and_grad(model, batch, lengths)
    optimizer.update(model, grad)
    mx.eval(model.parameters(), optimizer.state, loss)
    return loss.item()


tool = "mlx-lm" + (f" {spec['bits']}-bit" if spec.get("bits") else "") + ("(gc)" if spec.get("grad_checkpoint") else "")
peer_step_loop.run_steps(spec, step, tool, f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
