"""Per-epoch metrics as JSON Lines, rewritten atomically after every epoch (resume-safe)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from hpc_dgrab import fileio


class MetricsLog:
    """One JSON object per epoch in ``path``; on resume keeps the epochs up to ``resume_epoch``."""

    def __init__(self, path: Optional[str], resume_epoch: int = 0) -> None:
        self.path = path
        self.records: List[Dict[str, Any]] = []
        if path and resume_epoch > 0 and os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        rec = json.loads(line)
                        if int(rec.get("epoch", 0)) <= resume_epoch:
                            self.records.append(rec)

    def append(self, record: Dict[str, Any]) -> None:
        """Add one epoch's record and rewrite the file atomically."""
        self.records.append(record)
        if self.path:
            fileio.write_text(self.path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.records))


def format_epoch(rec: Dict[str, Any], epochs: int) -> str:
    """One human-readable progress line for an epoch's record."""
    parts = [f"epoch {rec['epoch']:>3}/{epochs}", f"train_loss {rec['train_loss']:.4f}",
             f"val_loss {rec['val_loss']:.4f}", f"val_acc {100 * rec['val_acc']:.2f}%",
             f"time {rec['epoch_time_s']:.2f}s", f"comm {rec['comm_bytes'] / 1e6:.2f} MB"]
    if "staleness_avg" in rec:
        parts.append(f"staleness avg {rec['staleness_avg']:.2f} max {rec['staleness_max']}")
    return "  ".join(parts)
