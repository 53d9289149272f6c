"""`facerecon` as a user runs it: a real subprocess over a folder with good and bad files."""
from __future__ import annotations

import json
import subprocess
import sys



def facerecon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend_server.cli.facerecon", *args],
                          capture_output=True, text=True, timeout=600)


def test_batch_reports_failures_skips_done_and_writes_outputs(tmp_path, grace_hopper_bytes):
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "hopper.jpg").write_bytes(grace_hopper_bytes)
    (photos / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    first = facerecon("reconstruct", str(photos), "-o", str(out), "--texture-size", "512", "-q")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "1 done, 1 failed, 0 skipped" in first.stdout
    assert "notes.png: bad_image" in first.stdout
    assert {p.name for p in out.iterdir()} == {"hopper.obj", "hopper.mtl", "hopper.png", "hopper.json"}
    facts = json.loads((out / "hopper.json").read_text())
    assert facts["texture"]["size_px"] == 512
    (photos / "notes.png").unlink()
    second = facerecon("reconstruct", str(photos), "-o", str(out), "-q")
    assert second.returncode == 0 and "0 done, 0 failed, 1 skipped" in second.stdout


def test_uv_only_and_all_faces(tmp_path, grace_hopper_bytes):
    photo = tmp_path / "g.jpg"
    photo.write_bytes(grace_hopper_bytes)
    done = facerecon("reconstruct", str(photo), "-o", str(tmp_path / "o"), "--uv-only", "--face", "all",
                     "--texture-size", "256", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"g_face0.png", "g_face0.json"}


def test_bad_arguments_are_refused_clearly(tmp_path):
    done = facerecon("reconstruct", "x.jpg", "--texture-size", "1000")
    assert done.returncode == 2 and "power of two" in done.stderr
    done = facerecon("reconstruct", "x.jpg", "--device", "tpu")
    assert done.returncode == 2 and "unknown device" in done.stderr
