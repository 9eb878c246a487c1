"""Training curves for a viewer, beside the metrics.jsonl every run writes: `mesp train --report-to tensorboard`.

As Hugging Face's Trainer and torchtune do, the run's scalars go into TensorBoard event files in the run
directory (OUT/tensorboard; view with `tensorboard --logdir OUT`), one point per step: train/loss,
train/learning_rate, train/tokens_per_s, train/grad_norm, eval/loss and memory/private_peak_mib (the
private-footprint peak so far, RssAnon + VmSwap + RssShmem). A resumed run purges the points after the step it
resumes from, so a curve never holds a step twice. The writer is torch.utils.tensorboard's; it needs the
optional extra `mesp[tensorboard]`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .errors import MespError
from .memory import MiB

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # inside the run directory

# metrics.jsonl key -> (TensorBoard tag, scale)
SCALARS = {"loss": ("train/loss", 1.0), "lr": ("train/learning_rate", 1.0),
           "tokens_per_s": ("train/tokens_per_s", 1.0), "grad_norm": ("train/grad_norm", 1.0),
           "valid_loss": ("eval/loss", 1.0), "private_peak_bytes": ("memory/private_peak_mib", 1.0 / MiB)}


class NoViewer:
    def write(self, record: dict) -> None:
        pass


class TensorBoardViewer:
    def __init__(self, out: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter  # heavy and optional
        except ImportError as e:
            raise MespError("report_to tensorboard: needs the tensorboard package: "
                            "pip install 'mesp[tensorboard]'") from e
        # purge_step drops the events a crashed or stopped run wrote after its last checkpoint
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        for key, (tag, scale) in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key] * scale, record["step"])
        self.writer.flush()  # a curve a user watches should not wait for the run's end

    def close(self) -> None:
        self.writer.close()


def check_report_to(report_to: str) -> None:
    if report_to not in REPORT_TO:
        raise MespError(f"report_to: unknown {report_to!r}; choose from {', '.join(REPORT_TO)}")


@contextmanager
def metric_writer(report_to: str, out: Path, start_step: int = 0):
    """A writer of each step's metrics record for `report_to`, closed at the end of the block."""
    check_report_to(report_to)
    if report_to == "none":
        yield NoViewer()
        return
    viewer = TensorBoardViewer(Path(out), start_step)
    try:
        yield viewer
    finally:
        viewer.close()
