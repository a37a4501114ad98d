"""Model families. Each module holds ModelArgs, named sizes, weight layout and pure layers."""
