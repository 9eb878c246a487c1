"""What `mesp bench report` measures, and the paper's published figures its tables put beside ours."""

from __future__ import annotations

from .converge import ConvergeSettings
from .fidelity import GradsSettings
from .process import ProcessSettings
from .sweep import MemorySettings

# The paper's published figures (arXiv 2602.13069), MB and seconds per step as published.
PAPER_TABLE1 = {"qwen2.5-0.5b": {"mebp": (360.8, 0.68), "mesp": (136.2, 0.86)},
                "qwen2.5-1.5b": {"mebp": (516.2, 1.66), "mesp": (262.6, 2.17)},
                "qwen2.5-3b": {"mebp": (637.6, 3.21), "mesp": (368.4, 4.09)}}
PAPER_TABLE2 = {128: (252.7, 110.7), 256: (360.8, 136.2), 512: (582.4, 245.8), 1024: (1050.3, 513.6)}  # mebp, mesp
PAPER_TABLE3 = {4: (355.2, 132.8), 8: (360.8, 136.2), 16: (372.4, 143.5), 32: (395.8, 158.2)}
PAPER_ABLATION = {"model": "qwen2.5-3b", "mebp": (637.6, 3.21), "store_h": (398.5, 3.85), "recompute_h": (368.4, 4.09)}
PAPER_MEZO_COSINE = 0.001
# Beside the 3B model at T=1024: Qualcomm's on-device exact-gradient fine-tuning (arXiv 2606.19528), GB as published.
PEER_3B_T1024 = {"model": "qwen2.5-3b", "seq_len": 1024, "source": "Qualcomm, arXiv 2606.19528", "exact_gb": 2.06,
                 "approximate_softmax_gb": 0.66}
# What the whole-process measure aims at, MiB of private footprint (the paper's whole app plus PyTorch's floor);
# and MeSP's at most this fraction of MeBP's at every size.
PROCESS_TARGETS_MIB = {("qwen2.5-0.5b", 256): 280, ("qwen2.5-1.5b", 256): 400, ("qwen2.5-3b", 256): 510,
                       ("qwen2.5-3b", 1024): 660}
PROCESS_TARGET_RATIO = 0.5

REPORT_MODEL = "qwen2.5-0.5b"


def report_memory_runs() -> list[MemorySettings]:
    """What the report measures, within an hour on 2 cores: fp32 throughout (bf16 matmuls run several times
    slower than fp32 on CPUs without bf16 instructions); the transformers+PEFT peer and the store-h ablation at
    0.5B only; times where the paper publishes them (Table 1, the ablation). In this order: the headline,
    Table 1, Table 2, Table 3, the ablation (the report's sections pick their runs by position)."""
    m = REPORT_MODEL
    return [MemorySettings([m], [256], [8], ["autograd", "mebp", "mesp", "mezo"], repeats=2),  # the headline
            MemorySettings(["qwen2.5-1.5b", "qwen2.5-3b"], [256], [8], ["mebp", "mesp"], repeats=1,
                           no_peer=True),  # Table 1
            # Tables 2 and 3: memory only, as published (no timed step: RSS is read during the profiled one)
            MemorySettings([m], [128, 512, 1024], [8], ["mebp", "mesp"], repeats=0, no_peer=True),
            MemorySettings([m], [256], [4, 16, 32], ["mebp", "mesp"], repeats=0, no_peer=True),
            MemorySettings([m], [256], [8], ["mesp"], repeats=1, store_h=True, no_peer=True)]  # the ablation


def report_process_runs() -> list[ProcessSettings]:
    """The whole-process measure (the paper's own): `mesp train` on a q4_0 base streamed from disk, T=256, r=8,
    batch 1, SGD, MeSP and MeBP per Table 1 model; then the 3B model at T=1024 with offloaded checkpoints."""
    return [ProcessSettings(models=list(PAPER_TABLE1), seq_lens=[256], rank=8, methods=["mesp", "mebp"]),
            ProcessSettings(models=[PEER_3B_T1024["model"]], seq_lens=[PEER_3B_T1024["seq_len"]], rank=8,
                            methods=["mesp"], offload_checkpoints=True)]


REPORT_GRADS = GradsSettings(models=["smollm2-135m-instruct", REPORT_MODEL], seq_len=32, rank=8,
                             directions=[1, 10, 100], trials=10)
REPORT_CONVERGE = ConvergeSettings(steps=20, mezo_factor=10)
