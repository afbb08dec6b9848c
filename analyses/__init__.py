"""Analyses of recorded histories and the experiments that train from them."""
