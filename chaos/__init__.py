"""Chaos tools for dtrain: kill real `torchrun` workers and check what survives.

    python -m chaos.run                      # what `make chaos` runs: crash trials, then goodput
    python -m chaos.run --quick              # a few minutes: fewer trials, shorter goodput runs

`crash` SIGKILLs a worker in every phase of a save and checks each restart; `goodput` measures
useful steps per second under a Poisson killer for several snapshot intervals. `phases` reads
which phase of a save a run dir is in; `launch` starts torchrun and reads what it leaves.
"""
