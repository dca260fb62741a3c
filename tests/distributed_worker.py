"""One rank of a data-parallel test run: ``torchrun --nproc-per-node N distributed_worker.py
JOBS.json``. Each job is the argument list of one ``sae-adaptive train`` command, run in this
process through ``cli.main``; a job's ``"resume_from"`` names a folder whose one run-id subfolder
holds checkpoints, and the one with the fewest samples is passed as ``--resume``; ``"expect_rc"``
is the exit status the job must end with (default 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sae_adaptive_plugin.cli import main


def _first_checkpoint(folder: str) -> str:
    (run,) = [p for p in Path(folder).iterdir() if p.is_dir()]
    return str(min((p for p in run.iterdir() if p.is_dir()), key=lambda p: int(p.name)))


def run(jobs_file: str) -> int:
    torch.set_num_threads(1)
    for job in json.loads(Path(jobs_file).read_text()):
        argv = list(job["argv"])
        if "resume_from" in job:
            argv += ["--resume", _first_checkpoint(job["resume_from"])]
        rc = main(argv)
        if rc != job.get("expect_rc", 0):
            print(f"job {argv} exited with {rc}", file=sys.stderr)
            return rc or 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
