"""The kfac-dist application: command line, data, training loop.

The ``kfac_dist`` library never imports it.
"""
