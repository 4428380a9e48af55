"""A ``qcompile serve`` subprocess on 127.0.0.1 and a free port, for the server tests: started,
waited for, and stopped with SIGTERM (whose exit status the caller checks)."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, artifact, *args: str, startup_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "QCOMPILE_API_KEY"} | {"OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "qcompiler.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples by name, with the labels other than ``model_name`` kept as
        ``name{label="value"}``."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                sample, value = line.rsplit(" ", 1)
                name, _, labels = sample.partition("{")
                kept = [x for x in labels.rstrip("}").split(",") if x and not x.startswith("model_name=")]
                out[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
        return out

    def stop(self, timeout: float = 20.0) -> tuple[int, str]:
        """SIGTERM, then the exit status and everything the server printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9, self.proc.stdout.read()
        return self.proc.returncode, self.proc.stdout.read()
