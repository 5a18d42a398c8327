"""Loading a ``.pt`` file without running it: tensors, containers and the few DeepSpeed types named here.

:func:`safe_torch_load` unpickles with ``weights_only=True`` and an allow-list, never arbitrary code: a run folder
may come from anyone, and unpickling runs whatever the file's author chose. torch is imported inside the functions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from factorllm_ds.errors import UserError

log = logging.getLogger("factorllm_ds")

# Globals (module.qualname) that torch.load(weights_only=True) must be told about, found by
# saving real checkpoints with DeepSpeed 0.19.8 / torch 2.13 (ZeRO-1, ZeRO-2, bf16, CPU offload,
# EP 1 and 2) and listing torch.serialization.get_unsafe_globals_in_checkpoint of every file:
# - mp_rank_00_model_states.pt and layer_*_expert_*_model_states.pt: none. They hold tensors,
#   OrderedDicts, dicts, lists and scalars only (ZeRO keeps the optimizer out of them; the
#   LambdaLR state stores its lambdas as None).
# - *zero_pp_rank_*_optim_states.pt: the three below (+ DynamicLossScaler, which an fp16 config's
#   loss scaler is, from DeepSpeed's source; the CPU accelerator cannot run fp16 to confirm).
MODEL_STATE_GLOBALS: tuple[str, ...] = ()
OPTIM_STATE_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def _import_globals(names: Sequence[str]) -> list:
    """The objects named; a name whose package is not installed is left out (a file needing it is refused)."""
    import pkgutil

    found = []
    for dotted in names:
        try:
            found.append(pkgutil.resolve_name(dotted))
        except (ImportError, AttributeError):
            log.debug("safe_torch_load: %s is not importable here; files that need it will be refused", dotted)
    return found


def safe_torch_load(path: Path, what: str, allow: Sequence[str] = MODEL_STATE_GLOBALS, mmap: bool = True):
    """``torch.load`` that runs no code from the file: ``weights_only=True`` plus the globals in ``allow``.

    ``what`` names the source for messages (``"--run"``). A file that needs any other global
    raises :class:`UserError` naming it (such a file is never unpickled, whoever wrote it); an
    unreadable file raises one that says it may be truncated. Tensors land on the CPU,
    memory-mapped when ``mmap`` (the default).
    """
    import pickle

    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_import_globals(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch 2.13 words it "WeightsUnpickler error: Unsupported global: GLOBAL module.name was not ..."
        found = (re.search(r"GLOBAL ([\w.]+)", str(err))
                 or re.search(r"WeightsUnpickler error: ([^\n]{1,200})", str(err)))
        detail = f" (first: {found[1]})" if found else ""
        raise UserError(f"{what} {path}: the file holds objects outside the allow-list of tensors, containers and "
                        f"DeepSpeed checkpoint types{detail}. It will not be unpickled, since unpickling can run any "
                        "code the file's author chose. Use a checkpoint written by factorllm-ds train.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"{what} {path}: unreadable checkpoint file ({type(err).__name__}: {err}). It may be "
                        "truncated; use another checkpoint or save it again.") from err
