"""A `privatelora ... --json` command run as a subprocess, as users run it: its JSON-line
events read as they come, stopped with SIGTERM (SIGKILL to its process group if stuck)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

CLI = [sys.executable, "-m", "privatelora.cli"]


class JsonProc:
    def __init__(self, *args, env: dict | None = None):
        self.proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, env={**os.environ, **(env or {})})
        self.events: list[dict] = []
        self._new = threading.Condition()
        self._err: list[str] = []          # stderr, drained as it comes (a full pipe would block the child)
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "not_json", "line": line}
            with self._new:
                self.events.append(event)
                self._new.notify_all()

    def wait_for(self, event: str, timeout: float = 180.0) -> dict:
        deadline = time.time() + timeout
        with self._new:
            while True:
                for e in self.events:
                    if e.get("event") == event:
                        return e
                left = deadline - time.time()
                if left <= 0 or self.proc.poll() is not None:
                    err = "".join(self._err)[-3000:]
                    raise AssertionError(f"no {event!r} event: {self.events}; stderr: {err}")
                self._new.wait(min(left, 1.0))

    def stop(self, timeout: float = 90) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        for t in self._readers:          # every event line, the last one included
            t.join(10)
        return {"rc": self.proc.returncode, "stderr": "".join(self._err)}
