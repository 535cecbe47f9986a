# Execute DAT "frame" (Frame Start on). One line: all logic is in livediffusion_td.
from livediffusion.plugins.touchdesigner import livediffusion_td as ld


def onFrameStart(frame):
    ld.on_frame_start(parent())
