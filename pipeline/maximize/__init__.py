"""Activation maximization in the style of Lucid's ``optvis``, batched and compiled.

The pieces are small and composable, and meet in one place only, :mod:`.render`:

- :mod:`.params` — parameterisations: raw numbers -> an image batch in [0, 1] (pixel or Fourier,
  with colour decorrelation for RGB and a grey version for 1-channel models);
- :mod:`.transforms` — seeded random transforms the image must survive (pad, jitter, scale,
  rotate), chained by ``compose``;
- :mod:`.objectives` — what to maximise, one value per image of the batch (channel mean, neuron,
  direction in channel space, class logit, diversity); ``+``, ``-``, ``*`` and ``/`` return new
  objectives;
- :mod:`.render` — one compiled graph runs every Adam step for a whole batch, each image
  serving its own objective;
- :mod:`.quality` — how far an image drives its unit compared with the dataset;
- :mod:`.plan` — which units, clusters and classes to render, and their seeds.

Importing this package is cheap; the submodules import TensorFlow.

Examples
--------
>>> from pipeline.maximize import objectives as obj, render  # doctest: +SKIP
>>> objective = obj.channel("conv3", [3, 7, 9])  # one unit per image of a batch of 3  # doctest: +SKIP
>>> result = render.render(model, objective, seeds=[0, 1, 2], steps=128)  # doctest: +SKIP
>>> result.images.shape  # doctest: +SKIP
(3, 32, 32, 3)
"""
