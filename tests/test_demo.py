"""`make demo`'s script (scripts/demo.sh) with a real `hjcg serve`: it answers, it stops at once with the log's
end when the server cannot start, and Ctrl-C leaves neither a server nor a pid file behind."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, free_port

DEMO = ROOT / "scripts" / "demo.sh"


def demo_env(**extra) -> dict:
    return {**os.environ, "BIN": str(Path(sys.executable).parent), "PORT": str(free_port()), **extra}


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_demo_streams_the_answer_the_readme_shows(tmp_path):
    result = subprocess.run(["bash", str(DEMO)], cwd=tmp_path, env=demo_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # the README's "`make demo` ... ends with:" block
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ending = re.search(r"ends with:\n\n(?:<!--.*?-->\n)?```text\n(.*?)```", readme, re.S)[1]
    assert ending.startswith("$ hjcg-client generate") and result.stdout.endswith(ending)
    assert "    | " in result.stdout  # the server's log was shown while it started
    assert not (tmp_path / ".hjcg-demo.pid").exists()
    assert "SmolLM2" in (tmp_path / "hjcg-demo.log").read_text()


def test_demo_stops_at_once_when_the_server_exits(tmp_path):
    model = tmp_path / "no-such-model"
    started = time.monotonic()
    result = subprocess.run(["bash", str(DEMO)], cwd=tmp_path, env=demo_env(HJCG_DEMO_MODEL=str(model)),
                            capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 60  # the server's own start and exit, not the 300 s wait
    assert "the server exited with status 1 before it was ready" in result.stderr
    # the end of hjcg-demo.log, with the server's reason
    assert f"cannot load the model: model '{model}'" in result.stderr.split("the last lines of hjcg-demo.log")[1]
    assert not (tmp_path / ".hjcg-demo.pid").exists()


def test_interrupted_demo_stops_the_server_and_removes_the_pid_file(tmp_path):
    demo = subprocess.Popen(["bash", str(DEMO)], cwd=tmp_path, env=demo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid_file = tmp_path / ".hjcg-demo.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline and demo.poll() is None, demo.communicate()
        time.sleep(0.05)
    server = int(pid_file.read_text())
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, out + err
    assert "interrupted" in err
    assert not pid_file.exists()
    assert gone(server, timeout=30)
