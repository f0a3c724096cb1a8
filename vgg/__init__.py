"""vgg-imagenet: the VGG nets A-E and the training/evaluation protocol of Simonyan & Zisserman (ICLR 2015).

The parts, each a folder; imports flow one way, top to bottom (docs/architecture.md):

    reproduce/    the paper's whole plan and its report            (reproduce.py)
    training/     a run, its loop, recipe, resume, signals, logs   (train.py)
    evaluation/   dense, multi-crop, multi-scale, fusion           (evaluate.py)
    config/       the run's configuration
    models/       VGG A-E, the neighbours, published weights
    data/         folders, shards, transforms, loaders, statistics (python -m vgg.data)
    core/         errors, processes, progress, checkpoint files

(evaluation uses training's step module only: autocast and top-k hits, shared with validation.)
"""
