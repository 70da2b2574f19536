"""longtrain.launch: starting the ranks and keeping them going: local processes (spawn.py), Ray
actors on an embedded instance or a cluster (ray_launcher.py; ray_placement.py: placement groups and the
layout after a node is lost or comes back; ray_connect.py: joining a cluster by address within
seconds; ray_eval.py: `longtrain eval` on Ray; ray_auth.py), env:// rendezvous
under torchrun / srun (dist_env.py), the failure policy (failures.py, elastic.py). Imports
train/ (a rank runs `train.run.train_rank`), config/ and checkpoint/; never the entry points."""
