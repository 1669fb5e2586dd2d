"""`hydra/launcher=slurm`'s class. Hydra only instantiates launchers from the `hydra_plugins` namespace;
the checks themselves live in `compresslab.launcher`."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

from compresslab.launcher import check_slurm_params


class SlurmLauncher(_SubmititSlurm):
    """submitit's SLURM launcher (one job array per sweep), with the settings checked before submitting."""

    def __init__(self, **params) -> None:
        check_slurm_params(params)
        super().__init__(**params)
