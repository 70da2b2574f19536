"""longtrain.train: what one rank does: its job from set-up to the last step (run.py), the step
itself (trainer.py), pipeline stages and their schedule (pipelined.py), metrics and what a step
achieved (throughput.py: s/step, TFLOP/s, MFU, ETA, the slowest rank), stop requests and the
stall watchdog (stopping.py), host-memory tuning and the measured baseline. Imports config/,
checkpoint/, planner/ (FLOP counts), models/, data/, parallel/; never launchers or entry points."""
