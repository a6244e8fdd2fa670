"""runtime: identity without MPI launchers, thread sizing, launcher rank parsing."""

from hpc_dgrab import runtime


def test_launcher_rank_prefers_open_mpi(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert runtime.launcher_rank() == 3


def test_launcher_rank_default(monkeypatch):
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert runtime.launcher_rank() == 0


def test_threads_split_cores_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    assert runtime._cpu_threads(4) == 2
    assert runtime._cpu_threads(16) == 1
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {2, 3, 4})  # bound by the launcher
    assert runtime._cpu_threads(4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert runtime._cpu_threads(4) == 5


def test_slurm_info(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    info = runtime.SlurmInfo.from_env()
    assert info.job_id == "1234" and info.procid == 0 and info.ntasks == 8 and info.localid is None
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    assert runtime.SlurmInfo.from_env() is None


def test_single_process_runtime():
    rt = runtime.get_runtime(set_threads=False)
    assert (rt.rank, rt.size, rt.local_rank, rt.local_size, rt.node_rank, rt.num_nodes) == (0, 1, 0, 1, 0, 1)
    assert rt.device == "cpu"


def test_child_env_puts_checkout_first_and_one_thread(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = runtime.child_env("/repo")
    assert env["PYTHONPATH"] == "/repo" + runtime.os.pathsep + "/elsewhere"
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert runtime.child_env("/repo", single_thread=False)["PYTHONPATH"] == "/repo"
