# Script TOP "script1" callbacks DAT. One line: all logic is in livediffusion_td.
from livediffusion.plugins.touchdesigner import livediffusion_td as ld


def onCook(scriptOp):
    ld.on_cook(parent(), scriptOp)
