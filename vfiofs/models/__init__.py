"""Built-in device models, by the name a definition's ``model`` field uses."""
