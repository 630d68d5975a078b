"""The CPU backend's console line: one short line per step with the few numbers a person watches
(``trainer.logger`` containing ``console``). Every metric still goes to ``metrics.csv`` and to the
other loggers (W&B, TensorBoard); verl's console logger, which prints all ~45 of them, is not used.
"""

from __future__ import annotations


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def line(m: dict, step: int, total: int, loss: str) -> str:
    """``step 3/100 | kept 0.100 | loss -0.0123 | rollout acc 0.750 | held-out KL 0.688 [0.61, 0.76] | 4.1 s/step``:
    the parts whose metric is present (step 0, the evaluation before training, has no kept ratio
    or loss); the held-out KL only at evaluations, with its bootstrap interval."""
    parts = [f"step {step}/{total}"]
    for key, label in (("ta_opd/kept_ratio", "kept"), (f"ta_opd/loss/{loss}", "loss"),
                       ("rollout/accuracy", "rollout acc"), ("val/student_accuracy", "val acc")):
        if m.get(key) is not None:
            parts.append(f"{label} {_num(float(m[key]))}")
    if m.get("ta_opd/heldout/kl") is not None:
        kl = f"held-out KL {m['ta_opd/heldout/kl']:.4g}"
        if m.get("ta_opd/heldout/kl_lo") is not None:
            kl += f" [{m['ta_opd/heldout/kl_lo']:.4g}, {m['ta_opd/heldout/kl_hi']:.4g}]"
        parts.append(kl)
    if m.get("ta_opd/timing/step_s") is not None:
        parts.append(f"{m['ta_opd/timing/step_s']:.2f} s/step")
    return "[ta-opd] " + " | ".join(parts)
