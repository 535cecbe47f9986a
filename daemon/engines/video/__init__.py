"""The streaming video engine (StreamDiffusionV2 manner) on Wan 2.1."""
