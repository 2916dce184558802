"""Model surgery: gates on the blocks, physical removal, and the architecture registry."""
