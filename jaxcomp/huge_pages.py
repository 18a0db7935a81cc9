"""Large host allocations on transparent huge pages, for XLA:CPU (Linux with glibc).

XLA:CPU allocates a program's temporaries afresh at every execution: 240 MB for
the student's train step. glibc maps a block that large from the kernel and unmaps
it when freed, so every step faults the whole block in again, 4 KB at a time:
59,000 page faults and about 100 ms of kernel time per student step on a 2-core
machine. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent
huge pages (`madvise`), and the same block then costs about 500 faults. glibc reads
tunables only when a process starts, so `restart_with_huge_pages` executes the
command again with the tunable set; a user's own `glibc.malloc.hugetlb` setting
(`=0` opts out) is left alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the tunable


def transparent_huge_pages_mode() -> str | None:
    """The kernel's THP mode ('always', 'madvise' or 'never'); None where it cannot tell."""
    try:
        with open(_THP_MODE_FILE) as file:
            modes = file.read().split()
    except OSError:
        return None
    return next((mode[1:-1] for mode in modes if mode.startswith("[")), None)


def environment_with_huge_pages(
    environ: Mapping[str, str], thp_mode: str | None, libc: tuple[str, str]
) -> dict[str, str] | None:
    """`environ` with the tunable added, or None when setting it would change nothing.

    Args:
      environ: the process environment.
      thp_mode: `transparent_huge_pages_mode()`; only 'madvise' gains from the tunable
        ('always' gives huge pages anyway, 'never' none at all).
      libc: `platform.libc_ver()`, e.g. ('glibc', '2.36').

    Returns:
      The new environment, or None: not glibc >= 2.35, THP not in 'madvise' mode, or
      `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb`.
    """
    name, version = libc
    try:
        numeric_version = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or numeric_version < _MIN_GLIBC or thp_mode != "madvise":
        return None
    if any(item.split("=")[0] == TUNABLE for item in _tunables(environ)):
        return None
    return with_hugetlb(environ, "1")


def with_hugetlb(environ: Mapping[str, str], value: str | None) -> dict[str, str]:
    """`environ` whose `GLIBC_TUNABLES` sets `glibc.malloc.hugetlb` to `value` ('1' or
    '0'), or leaves it unset (None); other tunables are kept."""
    tunables = [item for item in _tunables(environ) if item.split("=")[0] != TUNABLE]
    if value is not None:
        tunables.append(f"{TUNABLE}={value}")
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def _tunables(environ: Mapping[str, str]) -> list[str]:
    return [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]


def restart_with_huge_pages() -> None:
    """Executes this process's command line again with huge pages for large allocations,
    where that changes anything (see `environment_with_huge_pages`); returns otherwise.

    Call it first in a program's main function: the process is replaced (same pid),
    so nothing done before survives.
    """
    if not runs_on_cpu(os.environ, accelerator_plugins()):
        return
    environ = environment_with_huge_pages(
        os.environ, transparent_huge_pages_mode(), platform.libc_ver()
    )
    if environ is None:
        return
    print(
        f"jaxcomp: restarting with GLIBC_TUNABLES={environ['GLIBC_TUNABLES']} (huge pages for "
        f"XLA:CPU's per-step temporaries; GLIBC_TUNABLES={TUNABLE}=0 opts out)",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def accelerator_plugins() -> list[str]:
    """JAX's installed accelerator backends, found without importing JAX: PJRT plugins
    (the `jax_plugins` entry points, e.g. CUDA) and libtpu."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("tpu")
    return names


def runs_on_cpu(environ: Mapping[str, str], plugins: list[str]) -> bool:
    """Whether JAX will compute on the CPU: `JAX_PLATFORMS` names cpu first, or it is unset
    and no accelerator plugin is installed (huge pages only help XLA:CPU's temporaries)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not plugins
