"""The shared base every other part stands on: user errors, processes (distributed, CPU threads),
logging and progress, checkpoint files.

May import: nothing of vgg outside vgg.core.
"""
