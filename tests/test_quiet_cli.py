"""A quiet command line: MediaPipe's and TensorFlow Lite's native log lines stay off the terminal
(the README's command 1, `evaluate`, the server's workers), `--verbose` shows them, and nothing
of the program's own (summary, progress bar, errors, tracebacks) is lost."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from backend_process import ROOT, BackendProcess
from shared_protocol import ReconstructOptions
from shared_protocol.client import Client

# Written here independently of backend_server/cli/quiet.py: what a user must not see by default.
NOISE = re.compile(r"^(?:[IW]\d{4} \d\d:\d\d:|INFO: Created TensorFlow Lite|WARNING: All log messages before absl)",
                   re.MULTILINE)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_readme_command_1_prints_no_native_log_lines_and_verbose_shows_them(tmp_path):
    quiet = run("backend_server.cli.facerecon", "reconstruct", "--demo", "-o", str(tmp_path / "out"))
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert NOISE.findall(quiet.stdout + quiet.stderr) == [], quiet.stderr
    assert "1 done, 0 failed, 0 skipped" in quiet.stdout                       # the summary stays
    assert "grace_hopper.jpg -> " in quiet.stdout
    assert "100%|" in quiet.stderr and "1/1" in quiet.stderr                 # and so does the progress bar
    verbose = run("backend_server.cli.facerecon", "reconstruct", "--demo", "-o", str(tmp_path / "out2"), "-q",
                  "--verbose")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert NOISE.findall(verbose.stderr), "MediaPipe said nothing here: the quiet test above proves nothing"
    assert "1 done, 0 failed, 0 skipped" in verbose.stdout


def test_evaluate_prints_its_table_without_native_log_lines():
    done = run("backend_server.cli.facerecon", "evaluate", "--texture-size", "256")
    assert done.returncode == 0, done.stdout + done.stderr
    assert NOISE.findall(done.stdout + done.stderr) == [], done.stderr
    assert re.search(r"^grace_hopper\.jpg +\d+\.\d+ +0\.\d+", done.stdout, re.MULTILINE), done.stdout


def test_server_workers_log_their_jobs_but_no_native_lines_and_serve_a_glb(tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", workers=1).start()
    try:
        with Client(server.address) as client:
            result = client.reconstruct(grace_hopper_bytes, "g.jpg", ReconstructOptions(texture_size=256,
                                                                                         outputs=("json", "glb")))
        assert [(f.name, f.kind) for f in result.files] == [("g.glb", "glb"), ("g.json", "json")]  # a .glb served too
        assert result.files[0].data[:4] == b"glTF"
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "job " in log or "g.jpg" in log                                    # the server's own INFO lines
    assert NOISE.findall(log) == [], log[-3000:]


FILTER_PROBE = textwrap.dedent('''
    import multiprocessing, os, sys, time
    from backend_server.cli.quiet import quiet_native_logs

    def child():
        os.write(2, b"W0000 00:00:1795543271.307656   30148 calculator.cc:114] child noise\\n")
        os.write(2, b"child: a real problem\\n")
        print("child traceback line", file=sys.stderr, flush=True)

    if __name__ == "__main__":
        with quiet_native_logs():
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n"
                        b"I0000 00:00:1795543271.3 77 gl_context.cc:357] GL version: 3.2\\n"
                        b"E0000 00:00:1795543271.3 77 model.cc:12] a native error stays\\n")
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are ")
            time.sleep(0.5)                                     # a native line in two writes
            os.write(2, b"written to STDERR\\nmain: before")
            time.sleep(0.5)                                     # an own line without its newline yet
            os.write(2, b" and after\\n")
            time.sleep(0.3)                                     # (Python's own stderr bypasses the pipe)
            print("python stderr", file=sys.stderr)
            process = multiprocessing.get_context("spawn").Process(target=child)
            process.start()
            process.join()
            print("stdout is untouched")
        os.write(2, b"W0000 00:00:1.0 1 after.cc:1] after the filter: shown\\n")
''')


def test_the_filter_drops_native_lines_only_in_this_process_and_its_children(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(FILTER_PROBE)
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stdout is untouched\n"
    lines = done.stderr.splitlines()
    assert sorted(lines) == sorted([
        "E0000 00:00:1795543271.3 77 model.cc:12] a native error stays",
        "main: before and after",
        "python stderr",
        "child: a real problem",
        "child traceback line",
        "W0000 00:00:1.0 1 after.cc:1] after the filter: shown",
    ]), done.stderr
    assert lines[-1].endswith("after the filter: shown")
