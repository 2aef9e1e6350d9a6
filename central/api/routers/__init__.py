"""The API's route modules, one per area; ``central.api.create_app`` includes each module's ``router``."""
