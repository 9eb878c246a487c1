"""transformers + PEFT, the Trainer-free loop users write: AutoModelForCausalLM, the shared initial adapter
loaded trainable with PeftModel, loss from labels=input_ids, torch.optim SGD or AdamW over the LoRA parameters.
spec["gradient_checkpointing"]: recompute each layer in the backward (use_reentrant=False)."""

import peer_step_loop

spec = peer_step_loop.read_spec()

import peft  # noqa: E402 (after the thread count is in the environment)
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(spec["threads"])
transformers.utils.logging.set_verbosity_error()
model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
model.config.use_cache = False
if spec.get("gradient_checkpointing"):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = PeftModel.from_pretrained(model, spec["adapter"], is_trainable=True)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = (torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0) if spec["optimizer"] == "adamw"
             else torch.optim.SGD(params, lr=spec["lr"]))


def step(ids):
    x = torch.tensor([ids])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


tool = "hf+peft(gc)" if spec.get("gradient_checkpointing") else "hf+peft"
peer_step_loop.run_steps(spec, step, tool, f"transformers {transformers.__version__}, peft {peft.__version__}")
