"""A small orders service: the example users copy (models, service, projector)."""
