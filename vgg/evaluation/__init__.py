"""Testing a trained net the paper's ways (§3.2, §4): the test-time methods (methods.py: scales, dense,
multi-crop, fusion), the nets under test (nets.py), the validation images as evaluation reads them
(inputs.py), the evaluation of a whole set (runner.py) and its report (report.py: Tables 3-6's layout).

May import: vgg.training.step (autocast and top-k hits, shared with validation), vgg.config,
vgg.models, vgg.data, vgg.core. Never vgg.training's run or a command line.
"""
