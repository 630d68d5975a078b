"""Reproducing the paper's Tables 3/4 on the verl backend, in pipeline order: training prompts
(``python -m recipe.ta_opd.reproduce.data``), checkpoint evaluation with EvalScope
(``.evaluate``, driving ``evalscope_driver`` in the evaluation venv), aggregation into the tables
(``.results``). The training sweep itself is ``launch/sweep_paper.py``. Guide: docs/reproduce.md."""
