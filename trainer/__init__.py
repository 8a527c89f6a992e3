"""The learning side of SPIN: datasets and augmentation, the HMR regressor, losses, training and
evaluation. Imports from `trainer.data` and `fitting`, never from `pipeline`."""
