"""Installing into a user's own environment: an sdist built from the tree, installed with
``pip install --no-build-isolation`` into a fresh virtual environment that reuses this environment's torch, and the
message a build without torch stops with.

The fresh environments see this one's site-packages through a ``.pth`` line (``venv --system-site-packages`` over a
venv's python would reach the base interpreter's site-packages, not this venv's), so pip needs no index:
``--no-index --no-deps`` and no pip configuration keep it off the network.
"""
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 1200

# What the installed copy runs: where it was imported from, and one op of the compiled CPU kernels against the
# reference.
CHECK = textwrap.dedent("""
    import torch, pskernels, pskernels._C
    from pskernels.ref.merge_states import merge_states as ref_merge_states
    print("PACKAGE", pskernels.__file__)
    print("EXTENSION", pskernels._C.__file__)
    outs, lses = torch.randn(3, 2, 4, 5, 16), torch.randn(3, 2, 4, 5)
    out, lse = pskernels.merge_states(outs, lses, backend="cpu")
    want_out, want_lse = ref_merge_states(list(outs), list(lses))
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    print("MERGE OK")
""")


def _env(venv_dir, **extra):
    """The environment of a command in ``venv_dir``: activated (its bin first, then this one's for ninja), and no
    pip configuration or PIP_* variables of the machine (an index, find-links) that could send pip elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    bins = [os.path.join(venv_dir, "bin"), os.path.dirname(sys.executable)]
    env.update(PATH=os.pathsep.join(bins + [env.get("PATH", "")]), VIRTUAL_ENV=str(venv_dir),
               PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", MAX_JOBS="2", **extra)
    env.pop("PYTHONPATH", None)
    return env


def _make_venv(path, block_torch=False):
    """A venv without pip of its own that imports this environment's packages (pip, setuptools, torch);
    ``block_torch`` makes ``import torch`` fail in it, as in pip's isolated build environment."""
    venv.EnvBuilder(with_pip=False).create(path)
    py = os.path.join(path, "bin", "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lines = site.getsitepackages()
    if block_torch:
        lines.append('import sys; sys.modules["torch"] = None')
    with open(os.path.join(purelib, "pskernels_test_layer.pth"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return py


def _pip_install(py, target, env, cwd):
    cmd = [py, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-deps", "--no-cache-dir", target]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """``python -m build --sdist`` of a copy of the tree (building in place would leave pskernels.egg-info in it)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", ".hypothesis",
        ".benchmarks"))
    out = tmp / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(src)],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (archive,) = out.glob("pskernels-*.tar.gz")
    return archive


def test_sdist_carries_what_the_build_needs(sdist):
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {"setup.py", "pyproject.toml", "MANIFEST.in", "pskernels/synthesis/suites/workflows-smollm2.jsonl"}
    for d, exts in (("csrc", (".cpp", ".cu", ".h", ".cuh")), ("pskernels/checkpoints", (".json", ".safetensors"))):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            rel = os.path.relpath(dirpath, ROOT)
            want |= {os.path.join(rel, f) for f in files if f.endswith(exts)}
    assert "csrc/include/pskernels/math.h" in want and "csrc/cuda/device_helpers.cuh" in want
    assert want <= names, f"missing from the sdist: {sorted(want - names)}"


def test_install_from_sdist_into_a_new_environment(sdist, tmp_path):
    py = _make_venv(tmp_path / "env")
    env = _env(tmp_path / "env", PSKERNELS_NO_CUDA="1")
    res = _pip_install(py, str(sdist), env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    installed = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    info = subprocess.run([os.path.join(tmp_path, "env", "bin", "pskernels"), "info"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "extension: built" in info.stdout and "'cpu'" in info.stdout, info.stdout

    run = subprocess.run([py, "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert lines["PACKAGE"].startswith(os.path.join(installed, "pskernels")), lines["PACKAGE"]
    assert lines["EXTENSION"].startswith(os.path.join(installed, "pskernels", "_C")), lines["EXTENSION"]
    assert "MERGE OK" in run.stdout


def test_build_without_torch_stops_with_one_clear_message(sdist, tmp_path):
    """What pip's default build isolation meets: setup.py runs where torch is not importable. pip must show the
    message (it hides a successful build's output, not a failed one's) and no traceback."""
    py = _make_venv(tmp_path / "env", block_torch=True)
    res = _pip_install(py, str(sdist), _env(tmp_path / "env"), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "torch is not importable in this build environment" in out, out[-4000:]
    assert "Install torch first, then rerun with build isolation off" in out
    assert "pip install --no-build-isolation ." in out
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out[-4000:]
