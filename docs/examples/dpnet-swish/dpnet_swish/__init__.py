"""dpnet-swish: the swish activation and the Lion update rule, for dpnet."""
