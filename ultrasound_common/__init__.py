"""What more than one package shares: layers of both models (batch_norm), the project's errors and
the way every command reports them (errors). Imports neither launch nor a model package."""
