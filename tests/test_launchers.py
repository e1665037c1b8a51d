"""Hydra launcher configs (``conf/hydra/launcher``): SLURM via submitit, Ray."""

import os

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import iq_transform.cli.quantize  # noqa: F401  (registers the schemas)
from tests.test_cli import REPO
from tests.test_sweep import results_of, sweep

# hydra-ray-launcher 1.2.2, hydra_plugins/hydra_ray_launcher/_config.py:
# RayLauncherConf._target_ (the plugin is an optional extra, not installed in CI)
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def launcher_config(*overrides: str) -> dict:
    """``hydra.launcher`` of ``iq-quantize`` composed with ``overrides``, resolved."""
    with initialize_config_module(
        config_module="iq_transform.conf", version_base="1.3"
    ):
        config = compose(
            config_name="quantize", overrides=list(overrides), return_hydra_config=True
        )
    return OmegaConf.to_container(config.hydra.launcher, resolve=True)


def test_slurm_launcher_is_submitit_slurm_with_our_settings():
    launcher = launcher_config("hydra/launcher=slurm")
    assert launcher["_target_"] == SLURM_LAUNCHER
    assert launcher["partition"] is None
    assert launcher["timeout_min"] == 240
    assert launcher["gpus_per_node"] == 1
    assert launcher["cpus_per_task"] == 8
    assert launcher["mem_gb"] == 64
    assert launcher["array_parallelism"] == 16
    assert launcher["setup"] == ["export OMP_NUM_THREADS=8"]
    overridden = launcher_config(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.cpus_per_task=4",
        "hydra.launcher.timeout_min=30",
    )
    assert overridden["partition"] == "gpu" and overridden["timeout_min"] == 30
    assert overridden["setup"] == ["export OMP_NUM_THREADS=4"]


def test_slurm_launcher_submits_our_sbatch_script(tmp_path, monkeypatch):
    """A real ``iq-quantize -m`` against a fake ``sbatch`` that keeps the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: no cluster here" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = sweep(
        tmp_path / "multirun",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "transform=none,spikefree",
    )
    assert result.returncode != 0 and "sbatch: no cluster here" in result.stderr
    sbatch = script.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --array=0-1%2",  # two jobs, at most 16 at once
        "export OMP_NUM_THREADS=8",
    ):
        assert line in sbatch.splitlines(), line
    assert "-m submitit.core._submit" in sbatch


@pytest.mark.parametrize(
    ("launcher", "setting", "announces"),
    [
        ("joblib", "hydra.launcher.n_jobs=2", "Joblib"),
        ("submitit_local", "hydra.launcher.timeout_min=10", "Submitit 'local'"),
    ],
)
def test_local_launcher_runs_a_two_job_sweep(tmp_path, launcher, setting, announces):
    sweep_dir = tmp_path / "multirun"
    result = sweep(
        sweep_dir,
        f"hydra/launcher={launcher}",
        setting,
        "quant=w8a8_dynamic",
        "transform=none,spikefree",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert announces in result.stderr + result.stdout
    results = results_of(sweep_dir)
    assert sorted(r["transform"] for r in results) == ["none", "spikefree"]
    assert all(r["status"] == "ok" and r["ppl"] > 1 for r in results)


def test_ray_gpu_launcher_names_the_ray_plugin():
    launcher = launcher_config("hydra/launcher=ray_gpu")
    assert launcher == {
        "_target_": RAY_LAUNCHER,
        "ray": {"init": {"address": None}, "remote": {"num_gpus": 1}},
    }
    cluster = launcher_config(
        "hydra/launcher=ray_gpu", "hydra.launcher.ray.init.address=auto"
    )
    assert cluster["ray"]["init"]["address"] == "auto"


def test_every_config_folder_is_a_shipped_package():
    """A folder missing from pyproject's packages is left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"]["iq_transform.conf"] == "conf"
    conf = REPO / "conf"
    folders = [conf, *(p for p in conf.rglob("*") if p.is_dir())]
    folders = [f for f in folders if f.name != "__pycache__"]
    assert conf / "hydra" / "launcher" in folders
    for folder in folders:
        assert (folder / "__init__.py").is_file(), folder
        package = ".".join(("iq_transform.conf", *folder.relative_to(conf).parts))
        assert package in setuptools["packages"], package
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["ray"] == ["hydra-ray-launcher==1.2.2"]
    assert not any("ray" in requirement for requirement in extras["launchers"])
