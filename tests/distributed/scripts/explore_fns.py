"""A custom explore named by import path in the tests' runs (``custom_explore=...:halve_lr``)."""


def halve_lr(hyperparameters, space, rng):
    """The donor's values, with half its learning rate (inside the domain)."""
    values = dict(hyperparameters)
    values["lr"] = max(space["lr"].low, values["lr"] / 2)
    return values
