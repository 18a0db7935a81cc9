"""A finished run's model, read from what its workdir holds on disk.

A run's workdir has `config.json` (the experiment config), `checkpoints/` (orbax,
one directory per saved step) and, once the run has evaluated after its last
step, `eval.json`. That is all an export reads: the config says which model
and which quantization, the final checkpoint holds params, BatchNorm
statistics and the activation observers (`quant_stats`) or, for LSQ, the learned steps.
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxcomp import methods, prune, quant
from jaxcomp.models import channel_groups, create_model


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """The model of a finished run, ready to export.

    Attributes:
      workdir: the run's workdir.
      config: its `config.json`.
      step: the step of its final checkpoint (`config.train.steps`).
      model: the detector; for a channel-pruned run, the shrunk one.
      variables: {'params', 'batch_stats'} of `model` (pruned zeros kept).
      quant_stats: the activation observers, or None for a run without quantization.
      learned_steps: an LSQ run's learned step sizes and zero points
        ({'log_steps', 'zero_points'}), else None.
      quant_config: the run's `QuantConfig`, or None.
      shrunk_widths: the channel widths a channel-pruned run was shrunk to, else None.
    """

    workdir: str
    config: ml_collections.ConfigDict
    step: int
    model: nn.Module
    variables: dict[str, Any]
    quant_stats: Any
    quant_config: quant.QuantConfig | None
    shrunk_widths: dict[str, int] | None = None
    learned_steps: Any = None

    def int8_tree(self) -> dict[str, Any]:
        """The run's int8 serving tree: observer ranges (QAT, PTQ) or learned steps (LSQ).

        Raises:
          ValueError: the run has no quantization.
        """
        require_quantization(self.config, self.workdir)
        if self.learned_steps is not None:
            return quant.lsq.int8_tree(
                self.variables["params"],
                self.variables["batch_stats"],
                self.learned_steps["log_steps"],
                self.learned_steps["zero_points"],
                self.quant_config,
            )
        return jax.device_get(
            quant.convert_to_int8(
                self.variables["params"],
                self.variables["batch_stats"],
                self.quant_stats,
                self.quant_config,
            )
        )


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The `config.json` of a run's workdir, as a ConfigDict.

    Raises:
      FileNotFoundError: `workdir` holds no `config.json`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir!r} has no config.json, so it is not the workdir of a jaxcomp run; pass "
            "the --workdir a run was trained in (python -m jaxcomp.main ... --workdir=DIR)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def require_quantization(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises unless the run of `config` was quantized (QAT or PTQ), naming the fix."""
    if config.quant.mode == "none":
        raise ValueError(
            f"the run in {workdir} has no quantization (config.quant.mode='none'), so it has "
            "no int8 model; export it without --int8, or quantize it first "
            f"(configs/qat_int8.py or configs/ptq_int8.py with config.init_from={workdir!r})"
        )


def _resume_hint(workdir: str) -> str:
    return (
        f"resume it (python -m jaxcomp.main --config=<its config> --workdir={workdir}) and "
        "export it once it has finished"
    )


def final_step(workdir: str, config: ml_collections.ConfigDict) -> int:
    """The step of the run's final checkpoint, refusing a run that did not finish.

    A finished run has a checkpoint of step `config.train.steps` and an `eval.json`
    (written after the evaluation that follows the last step).

    Raises:
      ValueError: no checkpoint, an older newest checkpoint, or no `eval.json`.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    wanted = int(config.train.steps)
    if not steps:
        raise ValueError(
            f"the run in {workdir} did not finish: it has no checkpoint (looked in "
            f"{directory}); {_resume_hint(workdir)}"
        )
    if max(steps) < wanted:
        raise ValueError(
            f"the run in {workdir} did not finish: its newest checkpoint is step {max(steps)} "
            f"of config.train.steps={wanted}; {_resume_hint(workdir)}"
        )
    if not os.path.isfile(os.path.join(workdir, "eval.json")):
        raise ValueError(
            f"the run in {workdir} did not finish: it has no eval.json (written after the "
            f"final evaluation); {_resume_hint(workdir)}"
        )
    return wanted


def _restore(workdir: str, step: int) -> dict[str, Any]:
    """The checkpoint of `step` as host arrays, on this process's first device."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
        stored = dict(manager.item_metadata(step))
        missing = [name for name in ("params", "batch_stats") if name not in stored]
        if missing:
            raise ValueError(
                f"the checkpoint of step {step} in {directory} has no {missing}: it was not "
                "written by jaxcomp's training; pass the workdir of a jaxcomp run"
            )
        # Restored onto this process's device: without a target, orbax refuses a checkpoint
        # written on another topology.
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), stored
        )
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    # QAT and PTQ keep their observers in the quantization method's state; LSQ its
    # zero points there and its steps in the method's trainable parameters.
    quant_state = (restored.get("methods") or {}).get("quant", {})
    return jax.device_get(
        {
            "params": restored["params"],
            "batch_stats": restored["batch_stats"],
            "quant_stats": quant_state.get(quant.QUANT_STATS),
            "zero_points": quant_state.get("zero_points"),
            "log_steps": (restored.get("method_params") or {}).get("quant"),
        }
    )


def _shrink(config: ml_collections.ConfigDict, variables: dict, num_classes: int):
    """The physically smaller model of a channel-pruned run (zero channels removed)."""
    groups = channel_groups(variables)
    keep = prune.channel_keep_indices(variables, groups)
    widths = prune.group_widths(keep)
    model = create_model(
        config.model.name,
        num_classes=num_classes,
        depthwise_impl=config.model.depthwise_impl,
        channels=widths,
    )
    return model, prune.shrink_tree(variables, groups, keep), widths


def load_run(workdir: str) -> FinishedRun:
    """Reads the final model of the run in `workdir`.

    A channel-pruned run (`config.prune.method == 'channel'`) comes back shrunk: its
    zero channels removed, as `compression.json`'s 'shrunk' model. Other pruned runs
    keep their zeros in dense kernels.

    Args:
      workdir: the workdir of a finished run.

    Returns:
      The `FinishedRun`.

    Raises:
      FileNotFoundError: no `config.json`.
      ValueError: the run did not finish, or its checkpoint is not a jaxcomp one.

    Example:
      After `make demo` (its finished int8 stage):

          run = load_run("workdirs/demo/int8")
          tree = run.int8_tree()
    """
    config = read_config(workdir)
    step = final_step(workdir, config)
    state = _restore(workdir, step)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    # The heatmap's output channels are the classes: no dataset needed to export.
    num_classes = int(variables["params"]["heatmap"]["out"]["kernel"].shape[-1])
    quant_config = None
    if config.quant.mode != "none":
        quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    quant_stats = state["quant_stats"]
    learned_steps = None
    if config.quant.mode == "lsq":
        if state["log_steps"] is None or state["zero_points"] is None:
            raise ValueError(
                f"the run in {workdir} has config.quant.mode='lsq' but its checkpoint of step "
                f"{step} holds no learned steps or zero points; the checkpoint is not this "
                "config's, retrain it"
            )
        learned_steps = {"log_steps": state["log_steps"], "zero_points": state["zero_points"]}
    elif quant_config is not None and quant_stats is None:
        raise ValueError(
            f"the run in {workdir} has config.quant.mode={config.quant.mode!r} but its "
            f"checkpoint of step {step} holds no quant_stats (activation observers); the "
            "checkpoint is not this config's, retrain it"
        )
    widths = None
    if config.prune.method == "channel":
        model, variables, widths = _shrink(config, variables, num_classes)
    else:
        model = create_model(
            config.model.name,
            num_classes=num_classes,
            depthwise_impl=config.model.depthwise_impl,
            channels=config.model.channels,
        )
    return FinishedRun(
        workdir=workdir,
        config=config,
        step=step,
        model=model,
        variables=variables,
        quant_stats=quant_stats,
        quant_config=quant_config,
        shrunk_widths=widths,
        learned_steps=learned_steps,
    )
