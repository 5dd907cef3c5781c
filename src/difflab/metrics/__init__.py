"""Sample-quality metrics: FD/KID on a feature network, class-conditional accuracy, pixel-art colour statistics,
memorization. They take uint8 images and labels; nothing here makes samples or trains (only downward imports).

classifier.py  the data set's own small CNN (feature network + conditional accuracy)
features.py    feature networks: classifier penultimate layer, or FID Inception-v3
cache.py       real-image features cached on disk
scores.py      the torchmetrics Metrics (DDP-synced) and SampleMetrics, which runs them all
suite.py       MetricsConfig (conf/metrics/) and MetricsContext (what every evaluation needs once)
summary.py     results tables of a sweep; plot.py: its plots
"""
