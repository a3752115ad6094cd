"""The offline mini-world (see README.md): invented people and app content (world.py), our tasks and
their scripted solutions (scenarios.py), the builder (build.py), scripted episodes (play.py)."""
