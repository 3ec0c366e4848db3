"""XCA vessel segmentation (flow matching, CS-Net, MedSegDiff): the parts built so far.

The recipe itself (config, YAML mapping, `python -m recipes.xca`) is not wired yet: see issue #15.
unet.py, csnet.py, diffusion.py (models), flow.py (probability path, loss, samplers), sliding.py
(sliding-window inference), metrics.py (Dice/IoU/..., clDice, Betti errors), data.py (layout, crops),
synthetic.py (vessel writer).
"""
