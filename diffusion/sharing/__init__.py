"""Sharing a model: :mod:`.checkpoints` (the one reader of checkpoint files, weights-only; exported safetensors
folders), :mod:`.legacy` (files of earlier layouts, upgraded when read), :mod:`.diffusers_bridge` (to and from
diffusers' UNet2DModel / DDPMPipeline) and :mod:`.reproduce` (a grid's settings and the command that draws it again,
in its PNG text).
"""
