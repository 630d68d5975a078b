"""The fixed-context diagnostic (paper Section 3, Appendices C–F): which pre-update token signals
predict the same-context KL reduction between an initial and a trained student."""
