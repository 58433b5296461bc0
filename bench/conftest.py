"""pytest hooks of the benchmarks: collect ``bench_*.py`` (``testpaths`` is ``tests``) and the ``perf`` fixture.

The plumbing itself lives in ``bench_common.py``, a plain module (a second ``conftest`` module could be shadowed
by ``tests/conftest.py`` when imported by name).
"""
import pytest

import bench_common


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest itself; add bench_*.py found by directory recursion.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None



@pytest.fixture
def perf():
    return bench_common.perf()
