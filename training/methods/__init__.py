"""Method registry: name -> (method class, its config class)."""

from __future__ import annotations

from training.methods.advkd import AdvKD, AdvKDConfig
from training.methods.denoising_student import DenoisingStudent, DenoisingStudentConfig
from training.methods.edm import EDMTeacher, EDMTeacherConfig
from training.methods.emd import EMD, EMDConfig
from training.methods.sferd import SFERD, SFERDConfig
from training.methods.sid import SiD, SiDConfig

METHODS: dict[str, tuple[type, type]] = {
    "edm-teacher": (EDMTeacher, EDMTeacherConfig),
    "denoising-student": (DenoisingStudent, DenoisingStudentConfig),
    "sid": (SiD, SiDConfig),
    "sida": (SiD, SiDConfig),
    "emd": (EMD, EMDConfig),
    "sferd": (SFERD, SFERDConfig),
    "adv-kd": (AdvKD, AdvKDConfig),
}
