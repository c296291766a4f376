"""The dense student of a Switch teacher: same shape without experts, initialised from the teacher's weights.

The paper (section 4.2, Table 6) found that initialising the dense student with the teacher's non-expert weights
helps, since those weights are shared in shape. A Switch FFN has no single dense counterpart; the student's FFN
starts from the mean of the experts or from one chosen expert. Expert weights are stacked ``[E, D, F]`` /
``[E, F, D]`` while a dense FFN's ``nn.Linear`` stores ``[F, D]`` / ``[D, F]``, hence the transposes.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import torch

from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig

logger = logging.getLogger(__name__)

_EXPERT_SUFFIXES = {"experts.wi": "wi.weight", "experts.wo": "wo.weight"}  # teacher suffix -> student suffix


class ExpertInit(enum.Enum):
    """How the student's FFN in place of a Switch layer is initialised."""

    MEAN = "mean"  # the mean of all experts' weights
    EXPERT = "expert"  # one chosen expert's weights (``expert_index``)


@dataclasses.dataclass(frozen=True)
class StudentInit:
    """What initialising the student did: which tensors were copied, averaged or left at their random init."""

    copied: tuple[str, ...]  # student tensors copied unchanged from the teacher
    from_experts: tuple[str, ...]  # student FFN tensors made from the experts
    dropped: tuple[str, ...]  # teacher tensors with no place in the student (routers)
    random: tuple[str, ...]  # student tensors left as initialised (none for a Switch teacher of the same shape)


def student_config(teacher: ModelConfig) -> ModelConfig:
    """The teacher's shape with every FFN dense: the FLOP-matched dense model of a top-1 teacher."""
    return teacher.dense()


def expert_weight(experts_EXY: torch.Tensor, how: ExpertInit, expert_index: int) -> torch.Tensor:
    """``[E, X, Y]`` expert weights -> the ``[Y, X]`` weight of one dense ``nn.Linear``."""
    if how is ExpertInit.MEAN:
        return experts_EXY.mean(0).T.contiguous()
    if not 0 <= expert_index < experts_EXY.shape[0]:
        raise ValueError(f"expert_index={expert_index} is invalid: the teacher has {experts_EXY.shape[0]} experts")
    return experts_EXY[expert_index].T.contiguous()


@torch.no_grad()
def init_student_from_teacher(
    student: SwitchModelBase, teacher: SwitchModelBase, how: ExpertInit = ExpertInit.MEAN, expert_index: int = 0
) -> StudentInit:
    """Copy the teacher's non-expert weights into ``student`` and build each former Switch FFN from its experts."""
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied, from_experts, used = [], [], set()
    for name, tensor in student_state.items():
        source = teacher_state.get(name)
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source)
            copied.append(name)
            used.add(name)
            continue
        for teacher_suffix, student_suffix in _EXPERT_SUFFIXES.items():
            prefix = name.removesuffix(student_suffix)
            experts = teacher_state.get(prefix + teacher_suffix) if name.endswith(student_suffix) else None
            if experts is not None:
                tensor.copy_(expert_weight(experts, how, expert_index))
                from_experts.append(name)
                used.add(prefix + teacher_suffix)
                break
    done = set(copied) | set(from_experts)
    result = StudentInit(
        copied=tuple(copied),
        from_experts=tuple(from_experts),
        dropped=tuple(sorted(set(teacher_state) - used)),
        random=tuple(sorted(set(student_state) - done)),
    )
    logger.info(
        "student init: %d tensors copied, %d from experts (%s), %d teacher tensors dropped, %d left random",
        len(copied),
        len(from_experts),
        how.value,
        len(result.dropped),
        len(result.random),
    )
    return result
