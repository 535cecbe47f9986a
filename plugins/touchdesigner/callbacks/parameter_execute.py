# Parameter Execute DAT "pars" (OP: the component, Parameters: *, Value Change and On Pulse on).
from livediffusion.plugins.touchdesigner import livediffusion_td as ld


def onValueChange(par, prev):
    ld.on_value_change(parent(), par)


def onPulse(par):
    ld.on_pulse(parent(), par)
