"""Where users already are.

``tensorboard``: monitor records as scalars and text on any ``SummaryWriter``
(no import of TensorBoard).  ``lightning`` and ``transformers``: a
``SignalpropCallback`` each, driving :func:`signalprop.monitor` from the
Lightning ``Trainer`` and the HuggingFace ``Trainer``; they import their
framework (the ``[lightning]`` and ``[hf]`` extras) when imported, never
from ``import signalprop``.
"""
