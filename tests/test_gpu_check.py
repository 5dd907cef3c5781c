"""The GPU check's CPU mode (python bench/gpu_check.py --cpu): every check a GPU machine runs, on the CPU at small
sizes, so the script is known to work before a GPU is at hand (the speed comparison with the peers is bench.py's, and
is skipped here)."""

from __future__ import annotations

import json

from support import run_script


def test_the_gpu_check_runs_every_check_in_cpu_mode(tmp_path, cifar_root):
    result = run_script("bench/gpu_check.py", "--cpu", "--skip-bench", "--out", str(tmp_path), "--cifar-root", str(cifar_root),
                        "--cifar-unverified", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {row["check"].split(" ")[0] for row in report["checks"] if row["ok"]}
    assert {"train", "resume", "ddp", "sample.py", "evaluate.py", "edit.py", "cifar10"} <= checks
    assert {"edit.py inpaint on cpu", "edit.py inpaint cpu vs cpu", "edit.py vary on cpu", "edit.py interpolate on cpu"} <= \
        {row["check"] for row in report["checks"]}
    assert all(row["ok"] for row in report["checks"])
    cifar = next(r["detail"] for r in report["checks"] if r["check"].startswith("cifar10 train"))
    assert "images/s after step 10" in cifar and "20 images of (32, 32, 3)" in next(
        r["detail"] for r in report["checks"] if r["check"] == "cifar10 sample.py")
    assert "every weight and optimizer state equal" in next(r["detail"] for r in report["checks"] if r["check"] == "resume bit-exact")
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: cpu (CPU mode)")
