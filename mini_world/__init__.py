"""The offline default (see README.md): invented people and app content (world.py), our tasks and their
scripted solutions (scenarios.py), the builder (build.py), scripted episodes and the supervised warm
start (play.py), and the bundled model, SmolLM2-135M-Instruct (smollm2.py)."""
