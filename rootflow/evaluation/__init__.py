"""How rootflow's models are judged: the metric module, mask evaluation, ``rootflow evaluate``."""
