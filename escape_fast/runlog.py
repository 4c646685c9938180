"""The log of a training run: RUN_DIR/log.csv, and TensorBoard when it is installed."""

from __future__ import annotations

import csv
import os
import time


class CSVLog:
    """RUN_DIR/log.csv (one row per step and metric), and TensorBoard when installed."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled, self.tb = path, enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, **row):
        if not self.enabled:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["time", "stage", "epoch", "step", "name", "value"])
            if new:
                w.writeheader()
            w.writerow({"time": f"{time.time():.1f}", **row})
        if self.tb is not None:
            self.tb.add_scalar(f"{row['stage']}/{row['name']}", row["value"], row["step"])
