"""`composer -n N -m modernbert_train.train CONFIG.yaml [key=value ...]` (and `python -m`)."""

from modernbert_train.train.main import cli

cli()
