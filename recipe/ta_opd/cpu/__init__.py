"""The CPU backend: the TA-OPD dataflow of one verl step, on CPU, with tiny models."""
