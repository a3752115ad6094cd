"""The offline default (see README.md): invented people and app content (world.py), our tasks and their
scripted solutions (scenarios.py), the builder (build.py), scripted episodes and the supervised warm
start (play.py), and the models: the bundled SmolLM2-135M-Instruct and the tests' tiny one (smollm2.py)."""
