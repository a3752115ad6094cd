"""The specification of this project, as tests. Run: python -m pytest -q test_loop.py

Sections follow the modules: loop.py (the maths), appworld_env.py (the world), model.py and
rollout.py (one model that samples and learns), train.py (the whole loop). Everything runs on a CPU
with no internet: a tiny random model with SmolLM2's tokenizer, and the offline AppWorld mini-world.
"""
import torch

torch.set_num_threads(1)  # with the other core busy, 2 threads slow torch down badly (DESIGN.md 6)


# ====================================================================================== loop.py


# ============================================================================= appworld_env.py


# ===================================================================== model.py and rollout.py


# ===================================================================================== train.py
