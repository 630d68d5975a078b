"""Test support: verl 0.9.1's real ``RayPPOTrainer.fit()`` on CPU ranks (docs/verl_cpu_fit.md).

- ``platform``: a verl platform for CPU ranks (device cpu, gloo, Ray resource CPU).
- ``rollout``: a rollout replica that samples with a Hugging Face model and takes the actor's
  weights after every update.
- ``setup``: the Ray worker setup hook that registers them (plus the recipe's own hook).
- ``record``: recorders of what each step selected, received and computed.
- ``pair``: the toy pair with a tokenizer verl's agent loop accepts.
"""
