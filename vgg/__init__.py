"""vgg-imagenet: the VGG nets A-E and the training/evaluation protocol of Simonyan & Zisserman (ICLR 2015)."""
