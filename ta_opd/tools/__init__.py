"""Tools built on the TA-OPD core (``ta_opd``), which never imports them: the fixed-context
diagnostic (``python -m ta_opd.tools.diagnose``), the toy task and its embedded teacher-student
pair (``ta_opd.tools.toy``), the selector demo (``python -m ta_opd.tools.demo``). They may pull
pandas, matplotlib, tokenizers and transformers."""
