"""Splitting one engine's network over GPU ranks (torch.distributed); see partition.py."""
