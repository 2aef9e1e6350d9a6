"""`make demo`: the main job end to end on embedded defaults (run as `python -m demo`)."""
