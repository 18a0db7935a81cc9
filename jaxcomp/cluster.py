"""The command-line flags that make one run of several processes (`jax.distributed`).

`jaxcomp.main` and `jaxcomp.recipe` take the same four flags: `--distributed`, and
where JAX cannot find the other processes itself, `--coordinator_address`,
`--num_processes` and `--process_id`.
"""

from absl import app, flags


def define_flags() -> None:
    """Defines the four flags in absl's global FLAGS (once per program)."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() first (several GPU hosts or a TPU pod slice). On "
        "TPU VMs, SLURM and Open MPI it finds the other processes itself; elsewhere also pass "
        "the three flags below. On CPU the processes exchange gradients through gloo.",
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def check_flags(values: flags.FlagValues) -> None:
    """`check_distributed_flags` of the parsed flags."""
    check_distributed_flags(
        values.distributed, values.coordinator_address, values.num_processes, values.process_id
    )


def check_distributed_flags(
    distributed: bool,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Raises app.UsageError for a multi-process flag combination that cannot work.

    Without --distributed the other three flags would be ignored and every host
    would train alone into the same workdir, so they are refused.

    Args:
      distributed: --distributed.
      coordinator_address: --coordinator_address ('host:port'), or None.
      num_processes: --num_processes, or None.
      process_id: --process_id, or None.
    """
    cluster_flags = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [name for name, value in cluster_flags.items() if value is not None]
    if given and not distributed:
        raise app.UsageError(
            f"{', '.join(given)} given without --distributed, which they need: add "
            "--distributed (or drop them for a single-process run)"
        )
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise app.UsageError(
                f"--coordinator_address must be host:port of process 0, got "
                f"{coordinator_address!r}; e.g. --coordinator_address=10.0.0.2:1234"
            )
    if num_processes is not None and num_processes < 1:
        raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise app.UsageError(
            f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}; "
            "number the processes 0, 1, ..., n - 1"
        )


def initialize(values: flags.FlagValues) -> None:
    """Joins the other processes when --distributed is given.

    Must come before anything touches a device: the backend is created knowing its peers.
    """
    if values.distributed:
        import jax

        jax.distributed.initialize(
            coordinator_address=values.coordinator_address,
            num_processes=values.num_processes,
            process_id=values.process_id,
        )
