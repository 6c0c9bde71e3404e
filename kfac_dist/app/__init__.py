"""The kfac-dist application: command line, data, training loop.

The rest of ``kfac_dist`` (the library) never imports it; the top-level ``launch/`` folder of the repository
holds thin entry points (``python -m launch.train``) that call into it.
"""
