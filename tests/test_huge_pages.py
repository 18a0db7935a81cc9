"""`jaxcomp.huge_pages`: when a command restarts with the huge-pages tunable, and that it does."""

import os
import platform
import subprocess
import sys

import pytest

from jaxcomp import huge_pages

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize(
    ("environ", "thp_mode", "libc", "tunables"),
    [
        ({}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "madvise",
            GLIBC,
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        # The user's own setting, an opt-out included, stays.
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),
        ({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, "madvise", GLIBC, None),
        # Nothing to gain: THP always on or off, no THP, glibc too old, not glibc.
        ({}, "always", GLIBC, None),
        ({}, "never", GLIBC, None),
        ({}, None, GLIBC, None),
        ({}, "madvise", ("glibc", "2.31"), None),
        ({}, "madvise", ("", ""), None),
    ],
)
def test_the_tunable_is_added_only_where_it_helps(environ, thp_mode, libc, tunables):
    result = huge_pages.environment_with_huge_pages({"HOME": "/h", **environ}, thp_mode, libc)
    if tunables is None:
        assert result is None
    else:
        assert result == {"HOME": "/h", "GLIBC_TUNABLES": tunables}


def test_the_kernel_mode_is_the_bracketed_one(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "_THP_MODE_FILE", str(mode_file))
    assert huge_pages.transparent_huge_pages_mode() == "madvise"
    monkeypatch.setattr(huge_pages, "_THP_MODE_FILE", str(tmp_path / "missing"))
    assert huge_pages.transparent_huge_pages_mode() is None


def test_a_command_restarts_once_with_the_tunable():
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = (
        "import os; from jaxcomp import huge_pages; "
        "print('start', flush=True); huge_pages.restart_with_huge_pages(); "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = huge_pages.environment_with_huge_pages(
        environ, huge_pages.transparent_huge_pages_mode(), platform.libc_ver()
    )
    lines = result.stdout.split("\n")
    restarts = 1 if expected else 0
    assert lines.count("start") == 1 + restarts, result.stdout
    assert lines[-2].split()[1] == str(expected["GLIBC_TUNABLES"] if expected else None)
    # One line says so, with the opt-out.
    announced = [line for line in result.stderr.splitlines() if "restarting with" in line]
    assert len(announced) == restarts
    assert all("glibc.malloc.hugetlb=0 opts out" in line for line in announced)


def test_the_tunable_is_set_cleared_or_opted_out_keeping_the_others():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert huge_pages.with_hugetlb(environ, "0") == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0",
        "A": "b",
    }
    assert huge_pages.with_hugetlb(environ, None)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert huge_pages.with_hugetlb({}, "1") == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize(
    "environ, plugins, expected",
    [
        ({}, [], True),
        ({}, ["cuda"], False),
        ({"JAX_PLATFORMS": "cpu"}, ["cuda"], True),
        ({"JAX_PLATFORMS": "cuda,cpu"}, ["cuda"], False),
        ({"JAX_PLATFORMS": "tpu"}, [], False),
    ],
)
def test_restart_only_where_jax_computes_on_the_cpu(environ, plugins, expected):
    assert huge_pages.runs_on_cpu(environ, plugins) is expected
