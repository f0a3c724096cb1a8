"""Training (paper §3.1): one step (step.py), the epoch and validation loops (loop.py), SGD and the
plateau schedule (recipe.py), resume and warm start (resume.py), stop signals (signals.py), logs and
dashboards (logs.py), and a whole run built from a config as a few named steps (run.py): its parts built
(build.py, parts.py), its folder written (folder.py), its epochs (epochs.py).

May import: vgg.config, vgg.models, vgg.data, vgg.core. Never vgg.evaluation or a command line.
"""
