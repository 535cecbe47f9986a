"""Run once inside TouchDesigner to build livediffusion.tox (a .tox can only be made in TD).

In TD: create a Text DAT, set its File to this script, right-click > Run Script.  It expects
the folder that `livediffusion touchdesigner install` filled to be on TD's Python path
(the folder's README says how), builds the component in /project1 and saves
livediffusion.tox beside this script.
"""

import os

from livediffusion.plugins.touchdesigner.livediffusion_td import build_fixed_pages

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else \
    project.folder  # noqa: F821 - TD global
CALLBACKS = os.path.join(HERE, "callbacks")


def _text_dat(comp, name, filename):
    dat = comp.create(textDAT, name)  # noqa: F821 - TD global
    with open(os.path.join(CALLBACKS, filename)) as f:
        dat.text = f.read()
    return dat


def build(parent_path="/project1"):
    host = op(parent_path)  # noqa: F821 - TD global
    old = host.op("livediffusion")
    if old is not None:
        old.destroy()
    comp = host.create(baseCOMP, "livediffusion")  # noqa: F821 - TD global
    # the fixed pages (PAGES) and an empty Generation page: the component fills that one
    # from the engine's schema once it is connected, and rebuilds it when the engine changes
    build_fixed_pages(comp)
    inp = comp.create(inTOP, "in1")  # noqa: F821
    res = comp.create(resolutionTOP, "resolution1")  # noqa: F821
    res.inputConnectors[0].connect(inp)
    res.par.outputresolution = "custom"
    res.par.resolutionw.expr = "parent().par.Width"
    res.par.resolutionh.expr = "parent().par.Height"
    script = comp.create(scriptTOP, "script1")  # noqa: F821
    script.par.callbacks = _text_dat(comp, "script1_callbacks", "script_top.py")
    out = comp.create(outTOP, "out1")  # noqa: F821
    out.inputConnectors[0].connect(script)
    frame = _text_dat(comp, "frame_text", "frame_execute.py")
    execute = comp.create(executeDAT, "frame")  # noqa: F821
    execute.text = frame.text
    execute.par.framestart = True
    pars = comp.create(parameterexecuteDAT, "pars")  # noqa: F821
    pars.text = _text_dat(comp, "pars_text", "parameter_execute.py").text
    pars.par.op = comp
    pars.par.pars = "*"
    pars.par.valuechange = True
    pars.par.onpulse = True
    comp.save(os.path.join(HERE, "livediffusion.tox"))
    return comp


build()
