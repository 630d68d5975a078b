"""The verl 0.9.1 adapter of TA-OPD (the GPU path). Every formula comes from ``ta_opd``.

- ``fields``: batch field names and the layout conversions between verl and ``ta_opd``.
- ``teacher``: the FSDP2 teacher log-prob worker group (verl single controller).
- ``losses``: registrations with verl (distillation losses, policy loss) and the actor loss
  wrapper whose logits-processor call emits the TA statistics.
- ``actor``: verl's ActorRolloutRefWorker with that wrapper installed.
- ``trainer``: RayPPOTrainer with four methods overridden (teacher group, teacher + statistics,
  selection + mask, rollout bank).
- ``validate``: startup checks with clear errors.
- ``runner``: the task runner and ``run_verl``.
"""
