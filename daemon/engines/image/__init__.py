"""The image engine: StreamDiffusion-style img2img on SD-family UNets."""
