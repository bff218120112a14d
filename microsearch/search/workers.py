"""Local parallel workers: one process per worker (one per GPU), stopped together on Ctrl-C."""

import os
import signal
import subprocess
import sys

from microsearch.search.run import open_study, study_data
from microsearch.search.study import StudyConfig


def launch(
    study: StudyConfig,
    workers: int,
    gpus: list[str] | None = None,
    storage: str | None = None,
    worker_args: list[str] = (),
) -> int:
    """Start ``workers`` ``microsearch search`` processes on the study and wait for them all.

    Worker i is tagged i and, with ``gpus``, gets ``CUDA_VISIBLE_DEVICES=gpus[i]``
    (round robin); ``worker_args`` are passed on to each. The study is created (and its starting
    points enqueued) once, before they start.
    Returns the worst exit code.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    study_data(study)  # a wrong source fails here, before the study is stored (then cached)
    open_study(study, storage)
    procs = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        cmd = [
            sys.executable,
            "-m",
            "microsearch",
            "search",
            str(study.path),
            "--worker",
            str(i),
            *worker_args,
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        return max(p.wait() for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # each worker marks its running trial failed and exits
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
