"""The learning side of SPIN: tables, datasets and augmentation, the HMR regressor, losses,
training and evaluation. Imports from `fitting`, never from `pipeline`."""
