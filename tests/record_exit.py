"""``python tests/record_exit.py DIR -- COMMAND ...``: run COMMAND and write its exit status to
``DIR/rank-R.exit`` (R from the launcher's rank variables), so a test can assert every rank's exit
code and not only the launcher's. A signal death is written as its negative number; the signals a
launcher sends the wrapper are passed on to COMMAND. Standard library only (starts fast)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def main() -> int:
    out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--" and cmd, "usage: record_exit.py DIR -- COMMAND ..."
    rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
                 if v in os.environ), "0")
    child = subprocess.Popen(cmd)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    code = child.wait()
    tmp = os.path.join(out, f".rank-{rank}.exit.tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{code}\n")
    os.replace(tmp, os.path.join(out, f"rank-{rank}.exit"))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
