"""Distillation trainer for fastenc students: ``python -m train --config train.toml``.

Modules: ``config`` (dataclass config + overrides), ``data`` (prompt components, mixing, curricula),
``dit`` (frozen Flux / PixArt-α wrappers), ``student`` (init, EMA), ``teacher`` / ``teacher_cache``
(live T5-XXL or precomputed shards; ``python -m train.cache_teacher``), ``loop`` (step-following and
the embedding baseline), ``diagnostics`` (mode-collapse probe), ``images`` (teacher-vs-student grids),
``checkpoint`` (exact resume, student in fastenc format).
"""
