"""dpnet-resmlp: layers with weights and state, a residual block and a residual MLP model, for dpnet."""
