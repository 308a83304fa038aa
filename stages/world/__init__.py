"""The shapes world: a room of its own beside the pipeline stages.

`render` (scenes, renderer, captions, counterfactuals; the `world render` stage),
`judge` (pixel judge), `score` (edits scored against the counterfactual truth),
`evaluate` (the `world evaluate` stage), `train` (the autoencoder world's generator + e4e
and its CLIPs), `gan` + `e4e` (the StyleGAN2-way generator and e4e-way encoder),
`sspace` (the S-space test).

The world may import the pipeline stages (`stages.render`, `stages.edit` ...); no pipeline
stage imports the world (tests/test_architecture.py checks it). What the pipeline needs
from the world arrives as data: images, `labels.json`, the ground-truth folder and its
row label / row mark files.
"""
