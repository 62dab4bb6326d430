"""medvl: distributed training and hyperparameter platform for medical vision-language models on Ray.

Layers import downward only: config -> data -> models -> losses -> eval -> track -> train -> tune -> submit -> cli.
"""
__version__ = "0.1.0"
