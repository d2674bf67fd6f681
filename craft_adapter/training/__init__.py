"""CraFT training: the config, the collaborative loop, the prompt searches, the refiner, resume, evaluation,
and the public :func:`~craft_adapter.training.api.fit_adapter`."""
