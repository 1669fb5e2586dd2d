"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher with the project's checks (the class
is `hydra_plugins.compresslab_launcher.SlurmLauncher`: Hydra only takes launchers from that namespace).

submitit submits a sweep as one job array (`executor.map_array`), and its `checkpoint` hook requeues a
job on preemption or timeout; a requeued job then skips what already finished (cli's config-hash
rule). The checks here run before anything is submitted.
"""

from __future__ import annotations

from .errors import ConfigError


def check_slurm_params(params: dict) -> None:
    """Fail before submitting on settings SLURM would accept but the jobs could not live with."""
    timeout_s = int(params.get("timeout_min") or 0) * 60
    delay = int(params.get("signal_delay_s") or 0)
    # submitit asks SLURM to send USR1 `signal_delay_s` before the limit; if that is (nearly) the whole
    # limit the job is signalled at start and requeues itself in a loop.
    if timeout_s < 2 * (delay + 60):
        raise ConfigError(
            f"hydra.launcher.timeout_min={params.get('timeout_min')} ({timeout_s} s) is too close to "
            f"signal_delay_s={delay} + 60 s: SLURM would signal the job (almost) at once. Use timeout_min >= "
            f"{-(-2 * (delay + 60) // 60)} or lower hydra.launcher.signal_delay_s")
    for key in ("gpus_per_node", "cpus_per_task", "mem_gb"):
        value = params.get(key)
        if value is not None and int(value) < 0:
            raise ConfigError(f"hydra.launcher.{key}={value} must be >= 0 (or null)")
    def count(key, default):
        value = params.get(key)
        return default if value is None else int(value)

    tasks, gpus = count("tasks_per_node", 1), count("gpus_per_node", 0)
    if tasks < 1 or count("nodes", 1) < 1:
        raise ConfigError(f"hydra.launcher.tasks_per_node={params.get('tasks_per_node')} and nodes={params.get('nodes')} "
                          "must be >= 1")
    if 0 < gpus < tasks:  # distributed.py: one rank per GPU
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} ranks on gpus_per_node={gpus} GPUs: compresslab runs one "
                          f"rank per GPU; set hydra.launcher.gpus_per_node={tasks} (or 0 for CPU ranks)")
    if int(params.get("array_parallelism") or 1) < 1:
        raise ConfigError(f"hydra.launcher.array_parallelism={params.get('array_parallelism')} must be >= 1")
