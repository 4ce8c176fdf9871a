"""A stand-in for SLURM's sbatch, srun and sacct on this machine, for tests/run/test_cluster.py.

:func:`install` writes ``sbatch``, ``srun`` and ``sacct`` into a folder (put it first on PATH); each runs this file.

- ``sbatch <script>`` keeps a copy of the script it is given (``<state>/sbatch-<job id>.sh``) and answers
  ``Submitted batch job <id>``, as SLURM does. Then, by ``FAKE_SLURM_MODE``:
  ``complete``: each job of the script (each array index) counts as finished at once, without running: every task
  gets a result file ``("success", JobReturn())`` where submitit looks for it (the launcher returns, nothing runs);
  ``run``: a detached process runs the script for each array index, one after the other, in the environment SLURM
  gives a batch script (SLURM_JOB_ID, SLURM_ARRAY_*, SLURM_NNODES, SLURM_NTASKS[_PER_NODE], SLURM_JOB_NAME,
  SLURM_[JOB_]NODELIST=localhost); its ``srun`` line starts the tasks.
- ``srun [--output F] [--error F] [other options] cmd...`` starts SLURM_NTASKS copies of ``cmd`` at once, each with
  SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and SLURM_STEP_ID=0 (the ``%A %a %j %t`` of F replaced as SLURM does),
  and exits with the first non-zero exit status.
- ``sacct``: RUNNING while the run of a job is under way, then COMPLETED or FAILED (``<state>/<id>.rc``).
  The run's process (``<state>/run-<id>.pid``) leads a session of its own, which holds every process of the job.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

STATE_ENV = "FAKE_SLURM_STATE"


def install(bin_dir: Path, state_dir: Path) -> dict:
    """Write the three commands into ``bin_dir``; returns the environment additions that select them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "srun", "sacct"):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {name} \"$@\"\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", STATE_ENV: str(state_dir)}


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a script (``--flag`` alone: value True)."""
    options = {}
    for match in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE):
        options[match[1]] = True if match[2] is None else match[2].strip("'\"")
    return options


def _array_indices(options: dict) -> list[int | None]:
    if "array" not in options:
        return [None]
    first, last = options["array"].split("%")[0].split("-")
    return list(range(int(first), int(last) + 1))


def _job_env(job_id: str, index: int | None, options: dict) -> dict:
    nodes, per_node = int(options.get("nodes", 1)), int(options.get("ntasks-per-node", 1))
    env = dict(os.environ)
    env.update(SLURM_JOB_ID=job_id if index is None else f"{job_id}{index:02d}", SLURM_JOB_NAME=options.get("job-name", "sbatch"),
               SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
               SLURM_NTASKS=str(nodes * per_node), SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost")
    if index is not None:
        env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(index))
    return env


def _name(job_id: str, index: int | None) -> str:
    return job_id if index is None else f"{job_id}_{index}"


def sbatch(args: list[str]) -> int:
    state = Path(os.environ[STATE_ENV])
    script_path = Path(args[-1])
    script = script_path.read_text()
    job_id = str(4200 + len(list(state.glob("sbatch-*.sh"))))
    (state / f"sbatch-{job_id}.sh").write_text(script)
    options = sbatch_options(script)
    mode = os.environ.get("FAKE_SLURM_MODE", "complete")
    if mode == "complete":
        from hydra.core.utils import JobReturn, JobStatus
        from submitit.core.utils import cloudpickle_dump

        ntasks = int(options.get("nodes", 1)) * int(options.get("ntasks-per-node", 1))
        for index in _array_indices(options):
            name = _name(job_id, index)
            folder = Path(options["output"].replace("%A", job_id).replace("%a", str(index)).replace("%j", name)).parent
            folder.mkdir(parents=True, exist_ok=True)
            for task in range(ntasks):
                done = JobReturn()
                done.status = JobStatus.COMPLETED
                cloudpickle_dump(("success", done), folder / f"{name}_{task}_result.pkl")
            (state / f"{name}.rc").write_text("0")
    else:
        with open(state / f"run-{job_id}.log", "w") as log:
            runner = subprocess.Popen([sys.executable, __file__, "_run", job_id, str(script_path.resolve())],
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
        (state / f"run-{job_id}.pid").write_text(str(runner.pid))  # its session: the job's processes
    print(f"Submitted batch job {job_id}")
    return 0


def _run(args: list[str]) -> int:
    """The detached run of a submitted script (``run`` mode): each array index in turn."""
    state = Path(os.environ[STATE_ENV])
    job_id, script = args
    options = sbatch_options(Path(script).read_text())
    for index in _array_indices(options):
        name = _name(job_id, index)
        (state / f"{name}.running").write_text("")
        rc = subprocess.call(["bash", script], env=_job_env(job_id, index, options))
        (state / f"{name}.rc").write_text(str(rc))
    return 0


def _expand(pattern: str, task: int) -> str:
    job = os.environ["SLURM_JOB_ID"]
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    pattern = pattern.replace("%A", array_job or job).replace("%a", array_task or "")
    return pattern.replace("%j", f"{array_job}_{array_task}" if array_job else job).replace("%t", str(task))


def srun(args: list[str]) -> int:
    outputs, command = {}, list(args)
    while command and command[0].startswith("-"):
        option = command.pop(0)
        if option in ("--output", "--error"):
            outputs[option] = command.pop(0)
    ntasks, per_node = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
    procs = []
    with contextlib.ExitStack() as files:
        for task in range(ntasks):
            env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
                       SLURM_NODEID=str(task // per_node), SLURM_STEP_ID="0")
            out, err = (files.enter_context(open(_expand(outputs[o], task), "a")) if o in outputs else None
                        for o in ("--output", "--error"))
            procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def sacct(args: list[str]) -> int:
    state = Path(os.environ[STATE_ENV])
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for rc_file in sorted(state.glob("*.rc")) + sorted(state.glob("*.running")):
        name = rc_file.name.rsplit(".", 1)[0]
        if name.split("_")[0] in ids:
            if rc_file.suffix == ".rc":
                print(f"{name}|{'COMPLETED' if rc_file.read_text().strip() == '0' else 'FAILED'}|localhost")
            elif not (state / f"{name}.rc").exists():
                print(f"{name}|RUNNING|localhost")
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"sbatch": sbatch, "srun": srun, "sacct": sacct, "_run": _run}[command](rest))
