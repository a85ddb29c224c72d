"""Training: the generic trainer and the method classes (teacher EDM training and distillation methods)."""
