"""The issue-13 serving checks, end to end on the CPU with the tiny test models: bench/service_soak.py (a
short soak with a reload halfway) and bench/two_servers.py (two server processes, two models each).
Real `vqtok serve` processes on free localhost ports, real JPEGs; the scripts' own JSON is what is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--resize", "crop", "--warmup-size", "32", "--decode-threads", "2"]


def _run(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"bench.{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_soak_reloads_midway_without_errors(model_repo: Path, photos_val_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["--model-repo", str(model_repo), "--images", str(photos_val_dir), *TINY, "--concurrency", "4", "--client-procs", "1"]
    args += ["--saturation-seconds", "1", "--minutes", "0.1", "--window-s", "2", "--sample-s", "1", "--out", str(out)]
    proc = _run("service_soak", args, timeout=120)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a criterion failed (memory, on a 6 s run)
    result = json.loads(out.read_text())
    soak = result["soak"]
    assert result["status"] == "done" and soak["complete"], proc.stdout[-3000:]
    assert result["saturation"]["images_per_s"] > 0 and result["saturation"]["errors"] == {}
    assert soak["errors"] == 0 and soak["errors_by_status"] == {}
    assert soak["images_per_s"] >= 0.6 * soak["target_images_per_s"]
    reload = soak["reload"]
    assert reload["ok"] and reload["status"] == 200 and 0.3 * soak["seconds"] < reload["started_s"] < 0.7 * soak["seconds"]
    assert {r["model"] for r in reload["response"]["results"]} == {"fsq4", "simvq4"}
    assert reload["server_reloads_ok"] == {"fsq4": 1.0, "simvq4": 1.0}  # the server's counter: both really reloaded
    assert soak["during_reload"]["errors"] == 0
    assert len(soak["timeline"]) >= 3 and all(w["errors"] == 0 for w in soak["timeline"])
    assert sum(w["answered"] for w in soak["timeline"]) >= soak["answered"]
    assert len(soak["memory_samples"]) >= 4 and all(s["rss_mib"] > 0 for s in soak["memory_samples"])
    growth = soak["memory_growth"]["host_rss"]
    assert growth["start_t_s"] >= soak["seconds"] / 5 - 0.5 and growth["growth"] == (growth["end"] - growth["start"]) / growth["start"]
    assert "growth" in result["definitions"]
    verdict = result["verdict"]
    assert verdict["zero_errors"] and verdict["reload_ok"] and verdict["host_rss_growth_ok"] is not None


def test_two_servers_two_models_each(model_repo: Path, photos_val_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "two.json"
    args = ["--model-repo", str(model_repo), "--images", str(photos_val_dir), *TINY, "--seconds", "2", "--connections", "1"]
    proc = _run("two_servers", [*args, "--out", str(out)], timeout=120)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["pass"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(result["servers"]) == 2 and len({s["url"] for s in result["servers"]}) == 2
    assert all(set(s["models"]) == {"fsq4", "simvq4"} and s["ready_s"] > 0 for s in result["servers"])
    assert {(r["server"], r["model"], r["op"]) for r in result["load"]} == {
        (i, m, op) for i in (0, 1) for m in ("fsq4", "simvq4") for op in ("encode", "decode")
    }
    assert all(set(r["status"]) == {"200"} and r["ok"] > 0 for r in result["load"])
    assert result["token_agreement_across_servers"] == {"fsq4": 1.0, "simvq4": 1.0}  # same model, same CPU runtime


def test_overload_bench_measures_capacity_burst_and_levels(model_repo: Path, photos_val_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    args = ["--model-repo", str(model_repo), "--images", str(photos_val_dir), "--front-workers", "0", "--deadline", "1"]
    args += ["--seconds", "3", "--levels", "2", "--burst", "16", "--capacity-seconds", "2", "--client-procs", "1", "--out", str(out)]
    proc = _run("overload", args, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (mode,) = result["modes"]
    assert mode["server"] == "admission" and mode["front_workers"] == 0 and mode["capacity_images_per_s"] > 0
    burst = mode["burst"]
    assert burst["requests"] == 16 and burst["ok"] + burst["late_200"] + burst["refused_503"] + burst["deadline_504"] == 16
    (level,) = mode["levels"]
    assert level["offered_x_capacity"] == 2 and level["requests"] > 0 and level["other_statuses"] == []
    assert "| admission | 0 | 2x |" in proc.stdout
