"""The black-box boundary: the meter, the metered box, the pair scorer, retried vendor calls and the query cache.

Training reaches a model only through a :class:`~craft_adapter.blackbox.box.BlackBox`: prompts and images in,
numpy scores out, every call counted and refused before it is sent if it would pass the budget.
"""
