"""The work: job schema, model loading, generation, metadata. Never imports diffusiond.daemon."""
