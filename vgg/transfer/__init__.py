"""The paper's Appendix B: a net trained on ImageNet as an image descriptor for other datasets. The
datasets as distributed and their splits (datasets.py: class folders, PASCAL VOC, Caltech-101/256), the
descriptors and their cache on disk (features.py), the linear SVM and the metrics (classifier.py: VOC's
AP, mean class recall), the table beside the paper's Table 11 (report.py), and small generated copies of
each layout for the CPU demo and the tests (sample.py). `transfer.py` is its command line.

May import: vgg.evaluation, vgg.training.step (autocast, as evaluation uses it), vgg.config, vgg.models,
vgg.data, vgg.core. Nothing imports it but transfer.py.
"""
