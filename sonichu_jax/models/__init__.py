"""SONICHU networks: the ViT-B/16 backbone, ViTPose heads and the multi-task model."""
