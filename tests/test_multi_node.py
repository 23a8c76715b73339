"""The multi-node command of docs/splitting.md, run: two torchrun agents (``--nnodes 2``, one rank each)
meet over torchrun's c10d rendezvous on 127.0.0.1, as two machines would over their network,
and the worker's rows equal those of one agent with both ranks (``--standalone``).

What this does not show: two real machines, whose ranks would write their done markers on
their own disks; here both agents share this machine's folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.sweep.launch import complete_rows

pytestmark = pytest.mark.slow  # three torchrun jobs

REPO_ROOT = Path(__file__).resolve().parent.parent
# the cell (1F1B on the seed network at depth 4, B=16) and FSDP with Adam's state
CELLS = [{"spec": {"depth": 4}, "step": {"strategy": "pipeline-1f1b", "batch_size": 16, "microbatches": 4,
                                         "world_size": 2}},
         {"spec": {"depth": 4}, "step": {"strategy": "fsdp", "batch_size": 16, "world_size": 2, "optimizer": "adam"}}]
WORKER = ["-m", "bpmem.worker", "--cell", json.dumps(CELLS), "--repeats", "1", "--warmup", "0", "--timeout-s", "60"]


def _free_port() -> int:
    """A port nothing listens on now: the OS picks it, we let it go, the rendezvous takes it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _bytes_by_rank(rows: list[dict] | None) -> dict[tuple[int, int], dict[str, int]]:
    assert rows is not None
    return {(row["cell_index"], row["rank"]): {key: value for key, value in row.items() if key.endswith("_bytes")}
            for row in rows}


def _one_agent(out: Path) -> list[dict] | None:
    out.parent.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *WORKER, "--out", str(out)], capture_output=True, text=True,
                          env=_environment(), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return complete_rows(out, 2, len(CELLS))


def _two_agents(out: Path) -> list[dict] | None:
    """Both agents at once, as two nodes; c10d numbers them itself (``--node-rank`` would be
    ignored), and the rank whose agent joined first is rank 0."""
    port = _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"bpmem-{port}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    agents = [subprocess.Popen([*agent, *WORKER, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_environment()) for _ in range(2)]
    logs = []
    for process in agents:
        try:
            logs.append(process.communicate(timeout=240)[0])
        finally:
            process.kill()
    assert all(process.returncode == 0 for process in agents), "\n".join(logs)
    return complete_rows(out, 2, len(CELLS))


def test_two_torchrun_agents_give_every_ranks_row_with_the_one_agent_bytes(tmp_path: Path) -> None:
    two = _bytes_by_rank(_two_agents(tmp_path / "two" / "rows.json"))
    one = _bytes_by_rank(_one_agent(tmp_path / "one" / "rows.json"))
    assert sorted(two) == [(cell, rank) for cell in range(len(CELLS)) for rank in (0, 1)]
    assert two == one
    # the pipeline's two stages hold different bytes: the ranks really are two stages
    assert two[(0, 0)]["peak_bytes"] != two[(0, 1)]["peak_bytes"]
