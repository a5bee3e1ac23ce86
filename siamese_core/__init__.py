"""Koch et al. (2015) siamese networks for one-shot recognition, in plain PyTorch.

Nothing here imports Ray, S3 clients or MLflow: the core runs anywhere PyTorch does.
"""
