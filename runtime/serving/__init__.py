"""Serving and scale-out in one place: dd-run serve (Ray Serve), the Triton model repository
and its in-process Triton runner, dd-run batch on Ray."""
