"""Sample-quality metrics: FD/KID on a feature network, class-conditional accuracy, memorization.

classifier.py        the data set's own small CNN (feature network + conditional accuracy)
train_classifier.py  training it (train_classifier.py at the repo root)
features.py          feature networks: classifier penultimate layer, or FID Inception-v3
cache.py             real-image features cached on disk
scores.py            the torchmetrics Metrics (DDP-synced) and SampleMetrics, which runs them all
sampling.py          which samples each rank makes (independent of the world size)
suite.py             MetricsConfig (conf/metrics/) and MetricsContext (what every evaluation needs once)
callback.py          SampleQuality: val/fd, val/kid, val/cond_acc during training
evaluate.py          evaluate.py at the repo root; summary.py and plot.py: results tables and plots
"""
