"""Who may use the data plane: stage credentials (docs/design.md, "As built: security")."""
