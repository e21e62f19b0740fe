"""kukla: harvest activations, train Matryoshka dictionaries, evaluate them."""

__version__ = "0.1.0"
