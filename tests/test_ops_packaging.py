"""The top-level ``kernels/`` folder is the package ``repa_e_fast.kernels`` in a checkout and
in a built wheel (full and ``REPA_E_FAST_OPS_ONLY=1``), through the one symlink
``repa_e_fast/kernels -> ../kernels``."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from _paths import REPO as REPO_ROOT


def test_the_kernels_package_is_a_symlink_to_the_top_level_folder():
    link = os.path.join(REPO_ROOT, "repa_e_fast", "kernels")
    assert os.path.islink(link) and os.readlink(link) == os.path.join("..", "kernels")
    import repa_e_fast.kernels

    assert os.path.realpath(os.path.dirname(repa_e_fast.kernels.__file__)) == os.path.join(
        os.path.realpath(REPO_ROOT), "kernels")


@pytest.mark.parametrize("ops_only", ["0", "1"])
def test_a_wheel_installs_the_kernels_as_repa_e_fast_kernels(tmp_path, ops_only):
    # Built from a copy (symlinks kept), so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    for name in ("kernels", "repa_e_fast"):
        shutil.copytree(os.path.join(REPO_ROOT, name), source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO_ROOT, name), source / name)
    env = dict(os.environ, REPA_E_FAST_OPS_ONLY=ops_only, REPA_E_FAST_NO_NATIVE="1")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("repa_e_fast-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    kernel_files = sorted(f for f in os.listdir(os.path.join(REPO_ROOT, "kernels")) if f.endswith(".py"))
    installed = site / "repa_e_fast" / "kernels"
    assert not installed.is_symlink()
    assert sorted(f for f in os.listdir(installed) if f.endswith(".py")) == kernel_files
    for name in kernel_files:
        with open(os.path.join(REPO_ROOT, "kernels", name), "rb") as original:
            assert (installed / name).read_bytes() == original.read()
    code = "import repa_e_fast.kernels.group_norm as k, repa_e_fast.ops; print(k.__file__)"
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(installed / "group_norm.py")
