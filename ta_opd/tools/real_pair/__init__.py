"""The real-LM pair: SmolLM2-135M-Instruct as published (the student) and the same model fine-tuned
on arithmetic word problems generated in code (the teacher), built by
``python -m ta_opd.tools.real_pair.build`` (docs/real_lm.md)."""
