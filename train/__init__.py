"""longtrain.train: what one rank does: its job from set-up to the last step (run.py), the step
itself (trainer.py), pipeline stages and their schedule (pipelined.py), metrics, stop requests
and the stall watchdog (stopping.py), host-memory tuning and the measured baseline. Imports
config/, checkpoint/, models/, data/, parallel/; never launchers or entry points."""
