"""TouchDesigner component: all logic in livediffusion_td (no TD imports), DAT shims in
callbacks/, and build_component.py run once inside TD to make the .tox."""
