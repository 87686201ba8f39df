"""Run a graph of stages on worker processes, each stage as soon as the stages it needs are done.

The demo (:mod:`demo.run`) describes its experiment as :class:`Stage` objects; this module knows
nothing about the experiment. Each stage runs in a child process (a command line given by the
caller), its output goes to ``<log_dir>/<stage>.log``, and the child's latest tqdm line
(description, n/total) is parsed so that the parent draws one progress bar per running stage.
A stage counts as done when its process exits with 0 and ``is_done(name)`` says so (the demo
checks the stage's marker file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Stage", "fingerprint", "run_parallel"]


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``run`` (in-process) and the names of the stages it needs."""

    name: str
    deps: tuple[str, ...]
    run: Callable[[], dict[str, Any]]
    fingerprint: str = ""  # hash of the settings this stage and the stages it needs depend on


def fingerprint(params: Any, deps: list[str]) -> str:
    """A short hash of a stage's settings and its dependencies' fingerprints."""
    return hashlib.sha1(json.dumps([params, deps], sort_keys=True, default=str).encode()).hexdigest()[:16]


_PROGRESS = re.compile(r"(?:(?P<desc>[^\r\n|]*?):\s*)?\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


class _Worker:
    """One stage in a child process, with a progress bar fed from the child's tqdm output."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path, position: int):
        from tqdm.auto import tqdm

        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
        self.state = {"desc": name, "n": 0, "total": None}
        self.bar = tqdm(total=1, desc=name, position=position, leave=False, unit="it")
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with open(self.log_path, "wb") as log:
            pending = b""
            for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
                log.write(chunk)
                log.flush()
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for line in lines:
                    m = _PROGRESS.search(line.decode("utf-8", "replace"))
                    if m:
                        desc = (m.group("desc") or "").strip()
                        self.state = {"desc": f"{self.name}: {desc}" if desc else self.name,
                                      "n": int(m.group("n")), "total": int(m.group("total"))}

    def refresh(self) -> None:
        state = self.state
        if state["total"]:
            if self.bar.total != state["total"]:
                self.bar.reset(total=state["total"])
            self.bar.n = min(state["n"], state["total"])
        self.bar.set_description_str(state["desc"][:60], refresh=False)
        self.bar.refresh()

    def finish(self) -> int:
        code = self.proc.wait()
        self.thread.join()
        self.bar.close()
        return code


def run_parallel(stages: list[Stage], done: set[str], jobs: int, command: Callable[[str], list[str]],
                 is_done: Callable[[str], bool], on_done: Callable[[str], None], log_dir: Path, cwd: Path,
                 threads: int = 1) -> None:
    """Run the stages not in ``done`` on ``jobs`` worker processes, in the order of ``stages``,
    each as soon as all its dependencies are in ``done`` (which is updated in place).

    Args:
        command: the child's command line for a stage name.
        is_done: whether a stage whose process exited with 0 left its result (else it failed).
        on_done: called in the parent after each stage that finished.
        log_dir: where each stage's output goes (``<name>.log``).
        cwd: the children's working directory (put on their ``PYTHONPATH``).
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the children.

    Raises:
        RuntimeError: a stage failed (with the tail of its log), or the remaining stages need a
            stage that is neither done nor scheduled. The other running workers are stopped.
    """
    env = dict(os.environ, TQDM_MININTERVAL="0.5", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), *filter(None, [env.get("PYTHONPATH")])])
    todo = [s for s in stages if s.name not in done]
    running: dict[str, _Worker] = {}
    try:
        while todo or running:
            for stage in list(todo):
                if len(running) >= jobs:
                    break
                if all(d in done for d in stage.deps):
                    todo.remove(stage)
                    running[stage.name] = _Worker(stage.name, command(stage.name), env, cwd, log_dir,
                                                  position=1 + len(running))
            time.sleep(0.5)
            for name, worker in list(running.items()):
                worker.refresh()
                if worker.proc.poll() is None:
                    continue
                code = worker.finish()
                del running[name]
                if code != 0 or not is_done(name):
                    tail = worker.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"stage {name!r} failed (exit code {code}); its log is "
                                       f"{worker.log_path}:\n{tail}")
                done.add(name)
                on_done(name)
            if todo and not running and not any(all(d in done for d in s.deps) for s in todo):
                raise RuntimeError(f"stages {[s.name for s in todo]} cannot run: missing dependencies")
    finally:
        for worker in running.values():  # only on failure: stop the other workers we started
            worker.proc.terminate()
            worker.finish()
