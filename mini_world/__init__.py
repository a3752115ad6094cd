"""The offline mini-world: invented people and apps content (world.py) and our tasks (scenarios.py)."""
