"""The peers' workers: one small script per tool users would pick instead of mesp, run by `mesp bench peers`
with the peers environment's Python (`scripts/dev.sh peers` builds it in .peers/), each in a fresh process.

Each script imports only its own tool (never mesp, which that environment lacks) and `peer_step_loop`, the loop
they share: read the JSON spec named on the command line (the HF model directory, the pre-tokenized samples and
their order, the initial PEFT adapter every exact tool starts from, rank, alpha, optimizer, learning rate,
steps, threads), run the warm-up step and the timed steps, and write each step's loss and seconds as JSON. The
parent samples the process's memory from outside (mesp.memory.ProcessSampler), the same way for every tool.
"""
