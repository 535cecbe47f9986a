"""Building and loading networks: configs, checkpoint layouts, dtypes. Knows nothing of streams."""
