"""Method registry: name -> (method class, its config class)."""

from __future__ import annotations

from training.methods.edm import EDMTeacher, EDMTeacherConfig

METHODS: dict[str, tuple[type, type]] = {
    "edm-teacher": (EDMTeacher, EDMTeacherConfig),
}
