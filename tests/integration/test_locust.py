"""A short headless Locust run (loadtest/locustfile.py) against the in-process engine: every
task's requests reach the engine and succeed."""
from __future__ import annotations

import asyncio
import csv
import json
import sys

from tests.conftest import ROOT

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


async def test_headless_locust_run_succeeds(engine_app, tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4",
        "-t", "5s", "--host", engine_app.address, "--only-summary", "--csv",
        str(tmp_path / "locust"), "--json-file", str(tmp_path / "locust"),
        cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 120)  # the engine keeps serving
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]

    stats = {s["name"]: s for s in json.loads((tmp_path / "locust.json").read_text())}
    assert set(stats) == {"CreateAccounts", "CreateTransfers x1", "CreateTransfers x100",
                          "LookupAccounts"}
    for name, entry in stats.items():
        assert entry["method"] == "grpc"
        assert entry["num_requests"] > 0, name
        assert entry["num_failures"] == 0, name
    with open(tmp_path / "locust_stats.csv", newline="") as f:
        aggregated = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert int(aggregated["Request Count"]) > 0
    assert int(aggregated["Failure Count"]) == 0
