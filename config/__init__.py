"""longtrain.config: what a run is, before anything runs: loading TOML + `--set` overrides into
typed dataclasses (loading.py), the run's components composed into `TrainConfig` and validated
(train.py), the one device rule (device.py) and a config that starts from a Hugging Face model
(hf.py). Imports models/ and parallel/ for their configs and checks, never training, launching or
checkpoint code."""
